"""GRPO at the shapes users train: Qwen2.5-0.5B's and Qwen2.5-1.5B's, random-initialised from their
configs (nothing is downloaded), on this machine, with a profile of one iteration.

    python bench/real_shapes.py [--cases 0.5b-bf16-lora-packed ...] [--iterations 2]
    python bench/real_shapes.py --profile 0.5b-bf16-lora-packed

Shapes (Qwen2's: tied embeddings, biases on the attention projections, vocabulary 151,936 against a
tokenizer of 151,665 as Qwen ships: the ids past the tokenizer are sampled and decode to nothing),
built as transformers' Llama, which is Qwen2 with an o_proj bias more (896 or 1536 numbers a layer):
a `qwen2` config makes AutoTokenizer load Qwen2's byte-level BPE class over this word-level tokenizer,
which then encodes nothing):
- 0.5b: hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864 (494M parameters);
- 1.5b: hidden 1536, 28 layers, 12 heads / 2 KV heads, intermediate 8960 (1.54B parameters).
The random policy's responses end at EOS as a trained model's do: one residual dimension is held
constant and EOS's (tied) embedding reads it (about +EOS_LOGIT over every other token), so a
response ends after ~1 / P(EOS) tokens, roughly half of max_new_tokens, its length varying as real
ones do (the printed response_length says what came out).

A case is SHAPE-DTYPE-TRAINING-LAYOUT[-turns]: 0.5b or 1.5b; fp32 or bf16 (`dtype: bfloat16`:
bf16 autocast over float32 master weights); full (every weight, AdamW) or lora (rank 16 on every
linear layer, the reference is the base with the adapters off: no copy); packed or padded; turns:
multi-turn episodes (an environment answering each turn with 16 tokens, up to 4 turns of at most
64 tokens, 256 tokens after the prompt), else one turn of at most 256 tokens. The work of every
case: GRPO, 4 prompts of 32 tokens x 2 samples = 8 responses per iteration, top-p 0.95, the KL to
the reference in the loss (k3, 0.04), 1 epoch of 2 mini-batches, a reward function.

Each case runs `fastppo.ppo.train_ppo` in a fresh process for --iterations; per iteration: seconds
and tokens/s per phase (generation: response tokens / s; scoring (policy + reference log-probs,
reward): attended tokens / s; training: attended tokens / s), training GFLOP/s as a fraction of the
matmul peak in its dtype measured in the same run (model FLOPs: 6 per weight per token for full
training, 4 with LoRA, which computes no weight gradients of the base; the LM head on the response
tokens only), the peak RSS, the padding fraction. --profile runs the case's second iteration under
torch.profiler and splits its time: matmuls, attention, fastppo's kernels, other tensor ops, and the
rest (Python, the sampler's loop). Rows go to bench/results/real_shapes.csv.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {"0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864),
          "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, intermediate_size=8960)}
VOCAB, TOKENIZER, EOS = 151936, 151665, 3
PROMPTS, SAMPLES, PROMPT_LEN, NEW_TOKENS, EOS_LOGIT = 4, 2, 32, 256, 7.0
CASES = ["0.5b-bf16-lora-packed", "0.5b-bf16-lora-padded", "0.5b-fp32-lora-packed",
         "0.5b-bf16-full-packed", "0.5b-bf16-lora-packed-turns", "1.5b-bf16-lora-packed"]


def score(text: str) -> float:
    """The share of even word ids in the response (w12 yes, w7 no)."""
    words = text.split()
    return sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1)


def reward(prompts, responses, prompt_ids, response_ids) -> list[float]:
    return [score(r) for r in responses]


class Echo:
    """The multi-turn cases' environment: 16 words back after every turn, done after the 4th."""

    def reset(self, row: dict) -> str:
        self.turns = 0
        return row["prompt"]

    def step(self, turn: str):
        self.turns += 1
        return " ".join(f"w{(self.turns * 7919 + i) % 100000}" for i in range(16)), score(turn), \
            self.turns >= 4


def build(root: Path, shape: str) -> Path:
    """The random-init policy of `shape` with its tokenizer, and the prompts, under root."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from fastppo.data import write_jsonl
    words = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(TOKENIZER - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, attention_bias=True,
                         rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=2, eos_token_id=EOS, **SHAPES[shape])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # dimension 0 of the residual stream: 1 everywhere, nothing writes to it
        emb = lm.model.embed_tokens.weight  # tied: also the LM head
        emb[:, 0] = 1.0
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        # EOS's row reads dimension 0 of the final RMSNorm's output EOS_LOGIT more than every other
        # token's row; that dimension's value, measured on a prompt, sets the weight
        ids = torch.tensor([[2] + list(range(100, 100 + PROMPT_LEN))])
        normed = lm(ids, output_hidden_states=True).hidden_states[-1][0, :, 0].mean().item()
        emb[EOS, 0] += EOS_LOGIT / normed
    policy = root / f"policy-{shape}"
    lm.save_pretrained(policy)
    tok.save_pretrained(policy)
    rng = random.Random(0)
    write_jsonl(root / "prompts.jsonl", [
        {"prompt": " ".join(f"w{rng.randrange(TOKENIZER - 4)}" for _ in range(PROMPT_LEN))}
        for _ in range(PROMPTS * 8)])
    return policy


def parse(case: str) -> dict:
    parts = case.split("-")
    if len(parts) not in (4, 5) or parts[0] not in SHAPES or parts[1] not in ("fp32", "bf16") \
            or parts[2] not in ("full", "lora") or parts[3] not in ("packed", "padded") \
            or parts[4:] not in ([], ["turns"]):
        raise SystemExit(f"--cases: {case!r} is not SHAPE-DTYPE-TRAINING-LAYOUT[-turns] "
                         f"(e.g. 0.5b-bf16-lora-packed; shapes {sorted(SHAPES)})")
    return dict(shape=parts[0], dtype="float32" if parts[1] == "fp32" else "bfloat16",
                lora=parts[2] == "lora", packed=parts[3] == "packed", turns=len(parts) == 5)


def run_case(root: Path, policy: Path, case: str, iterations: int, profile: bool) -> dict:
    """One case in this process: per-iteration metrics (and the profile's split)."""
    import time

    import torch

    from fastppo import ppo
    from fastppo.config import PPOConfig
    c = parse(case)
    out = root / f"run-{case}"
    multi = dict(env="real_shapes:Echo", max_turns=4, max_new_tokens=64, max_episode_tokens=256) \
        if c["turns"] else dict(max_new_tokens=NEW_TOKENS)
    cfg = PPOConfig(prompts=str(root / "prompts.jsonl"), policy=str(policy), out=str(out),
                    reward_fn="real_shapes:reward", iterations=iterations,
                    batch_size=PROMPTS * SAMPLES, samples_per_prompt=SAMPLES,
                    advantage_estimator="grpo", mini_batch_size=PROMPTS * SAMPLES // 2,
                    ppo_epochs=1, kl_in_loss=True, kl_coef=0.04, kl_loss_estimator="k3",
                    top_p=0.95, lr=1e-5, dtype=c["dtype"], lora_rank=16 if c["lora"] else 0,
                    packed=c["packed"], save_every=10**6, seed=0, **multi)
    split = {}
    if profile:  # the second iteration under the profiler: started and stopped at iteration ends
        from torch.profiler import ProfilerActivity, profile as profiler
        prof, row = profiler(activities=[ProfilerActivity.CPU]), ppo.metrics_row

        def metrics_row(cfg_, iteration, *args, **kwargs):
            result = row(cfg_, iteration, *args, **kwargs)
            if iteration == 0:
                split["start"] = time.perf_counter()
                prof.__enter__()
            elif iteration == 1:
                prof.__exit__(None, None, None)
                split.update(profile_split(prof, time.perf_counter() - split.pop("start")))
            return result
        ppo.metrics_row = metrics_row
    ppo.train_ppo(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "profile": split, "threads": torch.get_num_threads()}


def profile_split(prof, wall: float) -> dict:
    """Seconds of the profiled iteration by kind: self CPU time of the ops, the rest is Python."""
    kinds = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn",
                        "aten::matmul", "aten::linear"),
             "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product")}
    seconds = {"matmul": 0.0, "attention": 0.0, "fastppo_kernels": 0.0, "other_ops": 0.0}
    top = {}
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6
        kind = next((k for k, names in kinds.items() if e.key.startswith(names)), None)
        if kind is None:
            kind = ("fastppo_kernels" if e.key.startswith(("fastppo", "Native")) or "Linear" in e.key
                    and e.key.endswith("Function") else "other_ops")
        seconds[kind] += s
        top[e.key] = s
    seconds["python_and_rest"] = max(0.0, wall - sum(seconds.values()))
    seconds["wall"] = wall
    seconds["top_ops"] = sorted(top.items(), key=lambda kv: -kv[1])[:12]
    return seconds


def summarise(case: str, result: dict, peaks: dict, dense: int, head: int) -> list[dict]:
    c = parse(case)
    per_weight = 4 if c["lora"] else 6
    out = []
    for r in result["rows"]:
        responses = r["response_length"] * PROMPTS * SAMPLES
        # every token after the prompt is attended (episodes: the environment's too); packed rows
        # compute those, padded rows the padded grid
        attended = (PROMPTS * SAMPLES * PROMPT_LEN + responses / r.get("model_token_fraction", 1.0))
        train_flops = per_weight * (dense * attended + head * responses) * 1  # 1 epoch
        train = r["time_train"]
        peak = peaks[c["dtype"]]
        out.append({
            "case": case, "iteration": r["step"], "response_length": round(r["response_length"], 1),
            "padding_fraction": round(r["padding_fraction"], 3),
            "generation_s": round(r["time_sync"] + r["time_generate"], 2),
            "scoring_s": round(r["time_old_logprobs"] + r["time_reference"] + r["time_score"], 2),
            "training_s": round(train, 2),
            "generation_tokens_per_s": round(responses / (r["time_sync"] + r["time_generate"]), 1),
            "scoring_tokens_per_s": round(attended / (r["time_old_logprobs"] + r["time_reference"]
                                                      + r["time_score"]), 1),
            "training_tokens_per_s": round(attended / train, 1),
            "training_gflops": round(train_flops / train / 1e9, 1),
            "training_of_peak": round(train_flops / train / 1e9 / peak, 3),
            "matmul_peak_gflops": round(peak, 1), "peak_mib": round(r["peak_memory_mib"]),
            "turns_per_episode": r.get("turns_per_episode", 1.0)})
    return out


def linear_weights(shape: str) -> tuple[int, int]:
    s = SHAPES[shape]
    h, kv = s["hidden_size"], s["num_key_value_heads"] * s["hidden_size"] // s["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * s["intermediate_size"]
    return s["num_hidden_layers"] * layer, h * VOCAB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=CASES, help="SHAPE-DTYPE-TRAINING-LAYOUT[-turns]")
    p.add_argument("--iterations", type=int, default=2, help="per case (the first is reported too: "
                   "it carries the first-use costs)")
    p.add_argument("--profile", metavar="CASE", help="profile this case's second iteration instead")
    p.add_argument("--worker", nargs=3, metavar=("ROOT", "POLICY", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        root, policy, case = args.worker
        print("RESULT " + json.dumps(run_case(Path(root), Path(policy), case, args.iterations,
                                              args.profile == case)))
        return
    import torch

    from common import append_csv, device_name, git_revision, matmul_gflops, today
    cases = [args.profile] if args.profile else args.cases
    for case in cases:
        parse(case)
    iterations = max(args.iterations, 2) if args.profile else args.iterations
    peaks = {dt: matmul_gflops("cpu", getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    device = device_name("cpu")
    print(f"{device}: matmul peak {peaks['float32']:.0f} GFLOP/s float32, "
          f"{peaks['bfloat16']:.0f} bfloat16 (2048^3, same run)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root, policies = Path(tmp), {}
        for case in cases:
            shape = parse(case)["shape"]
            if shape not in policies:
                policies[shape] = build(root, shape)
            proc = subprocess.run([sys.executable, __file__, "--worker", str(root),
                                   str(policies[shape]), case, "--iterations", str(iterations)]
                                  + (["--profile", case] if args.profile else []),
                                  capture_output=True, text=True, cwd=Path(__file__).parent)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            rows = []  # appended case by case: a stopped run keeps what it measured
            if proc.returncode or not line:
                print(f"{case}: failed (exit {proc.returncode}):\n{proc.stderr[-2500:]}", flush=True)
                rows.append({"date": today(), "revision": git_revision(), "device": device,
                             "torch": torch.__version__, "case": case,
                             "failed": proc.stderr.strip().splitlines()[-1][:200]
                             if proc.stderr.strip() else f"exit {proc.returncode}"})
                append_csv("real_shapes.csv", rows)
                continue
            result = json.loads(line[-1][7:])
            for r in summarise(case, result, peaks, *linear_weights(shape)):
                rows.append({"date": today(), "revision": git_revision(), "device": device,
                             "torch": torch.__version__, **r})
                print(" ".join(f"{k} {v}" for k, v in r.items()), flush=True)
            if result["profile"]:
                prof = result["profile"]
                print("profile of iteration 2: " + ", ".join(
                    f"{k} {v:.2f} s" for k, v in prof.items() if k != "top_ops"))
                for name, s in prof["top_ops"]:
                    print(f"  {s:8.3f} s  {name}")
                rows[-1].update({f"profile_{k}_s": round(v, 3) for k, v in prof.items()
                                 if k != "top_ops"})
            print("appended to", append_csv("real_shapes.csv", rows), flush=True)


if __name__ == "__main__":
    main()
