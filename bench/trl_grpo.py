"""fastppo's GRPO against TRL's GRPOTrainer on the same work, and TRL patched by fastppo.integrations.trl.

    python bench/trl_grpo.py [--dtypes float32 bfloat16] [--iterations 4] [--rounds 1]
    python bench/trl_grpo.py --cases lm_head [--vocab 32000 151936] [--repeat 5]

`grpo` (the default case): three sides, each in a fresh process, one after another:
- `fastppo`: the engine (`fastppo.ppo.train_ppo`), advantage_estimator grpo;
- `trl`: TRL's GRPOTrainer as TRL ships it;
- `trl+fastppo`: the same GRPOTrainer with `fastppo.integrations.trl.patch()` (its LM-head
  log-prob/entropy ops replaced by fastppo's kernels).
The same work on each side: bench/e2e.py's standard workload (a random-init Llama, hidden 256,
4 layers, vocabulary 32000, built once and read by all three), 4 prompts of 16 tokens x 4 samples
= 16 responses of 32 tokens per iteration, sampled at temperature 0.7; a reference model and the
KL in the loss (k3, beta 0.04); PPO-clip 0.2 on both sides; 4 epochs (TRL num_iterations) of 2
mini-batches of 8 (TRL per_device_train_batch_size 8, steps_per_generation 2): 8 AdamW steps
(lr 1e-5, grad-norm clip 1.0) per iteration; token-mean loss (TRL's default loss_type "dapo"),
group-std-scaled advantages (TRL's default scale_rewards "group"); the same reward function
(`score`: the share of even word ids in the decoded response). TRL is told min_new_tokens = 32
(every response full); fastppo has no such option, its responses are full unless the random policy
samples <eos> (~1 in 32000 per token): the printed response_length says.

Phases, defined the same for both (seconds per iteration; median over iterations 2..):
- generation: sampling the responses (fastppo: time_sync + time_generate; TRL: `_generate`);
- scoring: the policy's no-grad log-probs, the reference's, the reward, the advantages
  (fastppo: time_old_logprobs + time_reference + time_score; TRL: the rest of
  `_generate_and_score_completions`);
- training: the rest of the iteration: the 8 mini-batch forwards, backwards and optimizer steps
  (fastppo: time_train; TRL: from one iteration's last optimizer step to the next, less the two
  phases above).
tokens/s: generation = response tokens / s; scoring = (prompt + response) tokens / s; training =
(prompt + response) tokens x 4 epochs / s; iteration = response tokens x (1 + 4) / s (fastppo's
tokens_per_s). Training GFLOP/s = 6 x (the decoder's linear weights x (prompt + response) tokens +
the LM head's x response tokens) x 4 / s, given as a fraction of the matmul peak (2048^3 in the
run's dtype) measured in the same run. Peak MiB: the process's peak RSS over the whole run (models,
optimizer, everything). bf16: fastppo's `dtype: bfloat16` (bf16 autocast, float32 weights and
loss), TRL's `bf16=True` (the HF Trainer's bf16 autocast around the loss; TRL generates and scores
outside it). Rows go to bench/results/trl_grpo_iteration.csv.

`lm_head`: the op the patch replaces, alone: TRL's fused LM-head log-prob + entropy of 1024 rows
(hidden 256) against the whole vocabulary, forward + backward of log-probs (the training call),
median of --repeat, and its peak RSS growth, TRL as shipped against patched (bench/results/
trl_grpo.csv).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (allocator_env, append_csv, device_name, git_revision, matmul_gflops, peak_mib,
                    time_ms, today, _rss_kib)

SIDES = ("fastppo", "trl", "trl+fastppo")
PROMPTS, SAMPLES, RESPONSE, EPOCHS, MINI_BATCH, TEMPERATURE, BETA, LR = 4, 4, 32, 4, 8, 0.7, 0.04, 1e-5


def score(text: str) -> float:
    """The reward: the share of the response's words whose id is even (w12 yes, w7 no)."""
    words = text.split()
    return sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1)


def reward(prompts, responses, prompt_ids, response_ids) -> list[float]:  # fastppo's reward_fn
    return [score(r) for r in responses]


def trl_reward(completions, **_) -> list[float]:  # TRL's reward_funcs
    return [score(c) for c in completions]


def linear_weights(policy: str) -> tuple[int, int]:
    """(the decoder's linear weights, the LM head's): the matmul FLOPs per token are 2x these."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(policy)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * layer, c.hidden_size * c.vocab_size


def fastppo_side(root: Path, dtype: str, iterations: int) -> dict:
    from fastppo.config import PPOConfig
    from fastppo.ppo import train_ppo
    out = root / f"fastppo-{dtype}"
    train_ppo(PPOConfig(prompts=str(root / "prompts.jsonl"), policy=str(root / "policy"),
                        reward_fn="trl_grpo:reward", out=str(out), iterations=iterations,
                        batch_size=PROMPTS * SAMPLES, samples_per_prompt=SAMPLES,
                        advantage_estimator="grpo", mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS,
                        kl_in_loss=True, kl_coef=BETA, kl_loss_estimator="k3",
                        loss_reduction="token-mean", clip_eps=0.2, temperature=TEMPERATURE,
                        max_new_tokens=RESPONSE, lr=LR, max_grad_norm=1.0, dtype=dtype,
                        save_every=10**6, seed=0, overwrite=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"iterations": [
        {"generation": r["time_sync"] + r["time_generate"],
         "scoring": r["time_old_logprobs"] + r["time_reference"] + r["time_score"],
         "training": r["time_train"], "response_tokens": r["response_length"] * PROMPTS * SAMPLES}
        for r in rows]}


def trl_side(root: Path, dtype: str, iterations: int, patched: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastppo.data import read_jsonl
    if patched:
        import fastppo.integrations.trl as ftrl
        ftrl.patch()
    steps_per_iteration = EPOCHS * (PROMPTS * SAMPLES // MINI_BATCH)
    ends, spent = [], {"generate": [], "generate_and_score": [], "response_tokens": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                ends.append(time.perf_counter())

    args = GRPOConfig(output_dir=str(root / f"trl-{dtype}"), per_device_train_batch_size=MINI_BATCH,
                      steps_per_generation=PROMPTS * SAMPLES // MINI_BATCH,
                      gradient_accumulation_steps=1, num_generations=SAMPLES,
                      num_iterations=EPOCHS, max_completion_length=RESPONSE,
                      generation_kwargs={"min_new_tokens": RESPONSE}, temperature=TEMPERATURE,
                      beta=BETA, epsilon=0.2, loss_type="dapo", scale_rewards="group",
                      learning_rate=LR, max_grad_norm=1.0, max_steps=steps_per_iteration * iterations,
                      logging_steps=steps_per_iteration, report_to="none", use_cpu=True, seed=0,
                      save_strategy="no", bf16=dtype == "bfloat16")
    prompts = [r["prompt"] for r in read_jsonl(root / "prompts.jsonl", "ppo")]
    trainer = GRPOTrainer(model=str(root / "policy"), reward_funcs=trl_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[Clock()])

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            spent[name].append(time.perf_counter() - start)
            if name == "generate":  # (prompt ids, completion ids, ...)
                spent["response_tokens"].append(sum(len(ids) for ids in out[1]))
            return out
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score",
                                                    trainer._generate_and_score_completions)
    trainer.train()
    return {"iterations": [
        {"generation": g, "scoring": gs - g, "training": (end - begin) - gs, "response_tokens": n}
        for g, gs, n, begin, end in zip(spent["generate"], spent["generate_and_score"],
                                        spent["response_tokens"], ends, ends[1:])]}


def grpo_worker(side: str, root: Path, dtype: str, iterations: int) -> dict:
    result = (fastppo_side(root, dtype, iterations) if side == "fastppo"
              else trl_side(root, dtype, iterations, patched=side == "trl+fastppo"))
    result["peak_mib"] = _rss_kib("VmHWM") / 1024
    return result


def summarise(result: dict, dense: int, head: int, peak_gflops: float) -> dict:
    """Medians over iterations 2.. of each phase, its tokens/s, and training's share of the peak."""
    measured = result["iterations"][1:] or result["iterations"]
    med = {k: statistics.median(it[k] for it in measured)
           for k in ("generation", "scoring", "training", "response_tokens")}
    responses, tokens = med["response_tokens"], med["response_tokens"] + PROMPTS * SAMPLES * 16
    iteration = med["generation"] + med["scoring"] + med["training"]
    train_gflops = 6 * (dense * tokens + head * responses) * EPOCHS / med["training"] / 1e9
    return {"iteration_s": iteration, "generation_s": med["generation"],
            "scoring_s": med["scoring"], "training_s": med["training"],
            "tokens_per_s": responses * (1 + EPOCHS) / iteration,
            "generation_tokens_per_s": responses / med["generation"],
            "scoring_tokens_per_s": tokens / med["scoring"],
            "training_tokens_per_s": tokens * EPOCHS / med["training"],
            "training_gflops": train_gflops, "training_of_peak": train_gflops / peak_gflops,
            "response_length": responses / (PROMPTS * SAMPLES), "peak_mib": result["peak_mib"],
            "iterations": len(measured)}


def grpo(args) -> None:
    import importlib.metadata

    import torch

    from e2e import workload
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy, _, _ = workload(root, seed=0)  # the policy (and its tokenizer) and the prompts
        dense, head = linear_weights(str(policy))
        for dtype in args.dtypes:
            peak = matmul_gflops("cpu", getattr(torch, dtype))
            print(f"{device_name('cpu')}, {dtype}: matmul peak {peak:.0f} GFLOP/s (2048^3, same run)",
                  flush=True)
            for rnd in range(args.rounds):
                sides = SIDES if rnd % 2 == 0 else SIDES[::-1]  # alternate the order between rounds
                got = {}
                for side in sides:
                    got[side] = summarise(run_worker(["grpo", side, str(root), "--dtype", dtype,
                                                      "--iterations", str(args.iterations)]), dense, head, peak)
                    rows.append({"date": today(), "revision": git_revision(),
                                 "device": device_name("cpu"), "allocator": allocator_env(),
                                 "torch": torch.__version__, "trl": importlib.metadata.version("trl"),
                                 "dtype": dtype, "round": rnd, "side": side,
                                 "matmul_peak_gflops": round(peak, 1),
                                 **{k: round(v, 4) for k, v in got[side].items()}})
                for side in SIDES:
                    r = got[side]
                    print(f"{dtype} round {rnd} {side:12s} iteration {r['iteration_s']:.2f} s "
                          f"({r['tokens_per_s']:.0f} tok/s, x{got['trl']['iteration_s'] / r['iteration_s']:.2f} "
                          f"TRL)  generation {r['generation_s']:.2f} s  scoring {r['scoring_s']:.2f} s  "
                          f"training {r['training_s']:.2f} s ({r['training_gflops']:.0f} GFLOP/s, "
                          f"{100 * r['training_of_peak']:.0f}% of peak)  peak {r['peak_mib']:.0f} MiB  "
                          f"response {r['response_length']:.1f}", flush=True)
    print("appended to", append_csv("trl_grpo_iteration.csv", rows))


def run_worker(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *argv[:3], *argv[3:]],
                          capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def lm_head(vocab: int, repeat: int) -> dict:
    import torch
    import trl.trainer.utils as utils
    g = torch.Generator().manual_seed(0)
    rows, hidden_size = 1024, 256
    hidden = torch.randn(rows, hidden_size, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * hidden_size ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)

    def step():
        lp, ent, *_ = utils._ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.7,
                                                          utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                          ("log_probs", "entropy"))
        lp.sum().backward()
        hidden.grad = weight.grad = None

    ms, _, _ = time_ms(step, "cpu", repeat=repeat)
    return {"ms": ms, "peak_mib": peak_mib(step, "cpu")}


def lm_head_sides(args) -> None:
    import importlib.metadata

    import torch
    rows = []
    for vocab in args.vocab:
        got = {}
        for side in ("trl", "trl+fastppo"):
            got[side] = run_worker(["lm_head", side, str(vocab), "--repeat", str(args.repeat)])
            rows.append({"date": today(), "revision": git_revision(), "device": device_name("cpu"),
                         "allocator": allocator_env(), "torch": torch.__version__,
                         "trl": importlib.metadata.version("trl"), "case": "lm_head", "vocab": vocab,
                         "side": side, "ms": round(got[side]["ms"], 2),
                         "peak_mib": round(got[side]["peak_mib"], 1)})
        t, f = got["trl"], got["trl+fastppo"]
        print(f"lm_head V={vocab:6d}  TRL {t['ms']:9.1f} ms {t['peak_mib']:8.1f} MiB   patched "
              f"{f['ms']:9.1f} ms {f['peak_mib']:8.1f} MiB   speed x{t['ms'] / f['ms']:.2f}", flush=True)
    print("appended to", append_csv("trl_grpo.csv", rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["grpo"], choices=["grpo", "lm_head"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"], help="grpo: the precisions to run")
    p.add_argument("--iterations", type=int, default=4, help="grpo: iterations per side (the first "
                   "is a warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="grpo: runs of the three sides per dtype, "
                   "in alternating order")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936], help="lm_head")
    p.add_argument("--repeat", type=int, default=5, help="lm_head: timed repeats")
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # a grpo worker's
    # one side in this process: grpo SIDE ROOT (--dtype) | lm_head SIDE VOCAB
    p.add_argument("--worker", nargs=3, metavar=("CASE", "SIDE", "ARG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        case, side, arg = args.worker
        if case == "grpo":
            out = grpo_worker(side, Path(arg), args.dtype, args.iterations)
        else:
            if side == "trl+fastppo":
                import fastppo.integrations.trl as ftrl
                ftrl.patch()
            out = lm_head(int(arg), args.repeat)
        print("RESULT " + json.dumps(out))
        return
    for case in args.cases:
        grpo(args) if case == "grpo" else lm_head_sides(args)


if __name__ == "__main__":
    main()
