"""TRL's own GRPOTrainer, as TRL ships it and patched by fastppo.integrations.trl, side by side.

    python bench/trl_grpo.py [--vocab 32000 151936] [--steps 6] [--repeat 5]

Two measurements per vocabulary, each side in a fresh process (one run each, side by side):
- `grpo_step`: TRL's GRPOTrainer on a random-init Llama (hidden 256, 2 layers, 4 heads), 8 prompts of
  16 tokens x 4 generations = 32 completions of 32 tokens (min_new_tokens = max: every completion is
  full), sampling at T = 0.7, beta = 0.04 (a reference model), one optimiser step per generation.
  Median over steps 2.. of TRL's own `step_time` (generation, reference and policy log-probs, loss,
  backward, optimiser) and of the step's peak RSS above the RSS at its start.
- `lm_head`: the op the patch replaces, alone: TRL's fused LM-head log-prob + entropy of 32 x 32 =
  1024 rows (hidden 256) against the whole vocabulary, forward + backward of log-probs (the training
  call), median of --repeat, and its peak RSS above the start.
Appends rows to bench/results/trl_grpo.csv and prints the fastppo / TRL ratios.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (allocator_env, append_csv, device_name, git_revision, peak_mib, time_ms, today,
                    _rss_kib)

HIDDEN, LAYERS, PROMPTS, GENERATIONS, PROMPT_LEN, COMPLETION = 256, 2, 8, 4, 16, 32


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(vocab - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", padding_side="left")


def _model_dir(vocab: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    path = tempfile.mkdtemp(prefix="trl-grpo-bench-")
    LlamaForCausalLM(config).save_pretrained(path)
    _tokenizer(vocab).save_pretrained(path)
    return path


def grpo_step(vocab: int, steps: int) -> dict:
    import random
    import statistics

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    path = _model_dir(vocab)
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(PROMPT_LEN - 1))
               for _ in range(PROMPTS * steps)]
    peaks = []

    class PeakRSS(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.base = _rss_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")

        def on_step_end(self, *args, **kwargs):
            peaks.append((_rss_kib("VmHWM") - self.base) / 1024)

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS * GENERATIONS,
                      num_generations=GENERATIONS, max_completion_length=COMPLETION,
                      generation_kwargs={"min_new_tokens": COMPLETION}, max_steps=steps,
                      learning_rate=1e-5, beta=0.04, temperature=0.7, logging_steps=1,
                      report_to="none", use_cpu=True, seed=0, save_strategy="no", bf16=False)
    trainer = GRPOTrainer(model=path, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=_tokenizer(vocab), callbacks=[PeakRSS()])
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    return {"ms": 1e3 * statistics.median(times[1:]), "peak_mib": statistics.median(peaks[1:])}


def lm_head(vocab: int, repeat: int) -> dict:
    import torch
    import trl.trainer.utils as utils
    g = torch.Generator().manual_seed(0)
    rows = PROMPTS * GENERATIONS * COMPLETION
    hidden = torch.randn(rows, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=g) * HIDDEN ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)

    def step():
        lp, ent, *_ = utils._ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7,
                                                          utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                          ("log_probs", "entropy"))
        lp.sum().backward()
        hidden.grad = weight.grad = None

    ms, _, _ = time_ms(step, "cpu", repeat=repeat)
    return {"ms": ms, "peak_mib": peak_mib(step, "cpu")}


def worker(side: str, case: str, vocab: int, steps: int, repeat: int) -> None:
    if side == "fastppo":
        import fastppo.integrations.trl as ftrl
        ftrl.patch()
    out = grpo_step(vocab, steps) if case == "grpo_step" else lm_head(vocab, repeat)
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cases", nargs="+", default=["lm_head", "grpo_step"])
    p.add_argument("--worker", nargs=3, metavar=("SIDE", "CASE", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, case, vocab = args.worker
        return worker(side, case, int(vocab), args.steps, args.repeat)
    import importlib.metadata

    import torch
    rows = []
    for vocab in args.vocab:
        for case in args.cases:
            got = {}
            for side in ("trl", "fastppo"):
                proc = subprocess.run([sys.executable, __file__, "--worker", side, case, str(vocab),
                                       "--steps", str(args.steps), "--repeat", str(args.repeat)],
                                      capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"{side} {case} V={vocab} failed:\n{proc.stderr[-3000:]}")
                got[side] = json.loads(line[-1][7:])
                rows.append({"date": today(), "revision": git_revision(), "device": device_name("cpu"),
                             "allocator": allocator_env(), "torch": torch.__version__,
                             "trl": importlib.metadata.version("trl"), "case": case, "vocab": vocab,
                             "side": side, "ms": round(got[side]["ms"], 2),
                             "peak_mib": round(got[side]["peak_mib"], 1)})
            t, f = got["trl"], got["fastppo"]
            print(f"{case:9s} V={vocab:6d}  TRL {t['ms']:9.1f} ms {t['peak_mib']:8.1f} MiB   fastppo "
                  f"{f['ms']:9.1f} ms {f['peak_mib']:8.1f} MiB   speed x{t['ms'] / f['ms']:.2f}", flush=True)
    print("appended to", append_csv("trl_grpo.csv", rows))


if __name__ == "__main__":
    main()
