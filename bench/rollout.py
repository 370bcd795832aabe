"""Generation throughput of the rollout engines, "hf" (the built-in sampler) against "vllm", on one
policy, in one process, side by side.

    python bench/rollout.py [--repeat 3] [--engines hf vllm] [--device cpu]

Policy: bench/e2e.py's (Llama-style, hidden 256, 4 layers, head_dim 64, vocabulary 32000, random
init). Workloads: the e2e one (16 prompts of 16 tokens, 32 new tokens) and a larger batch (256
prompts x 128 new tokens), temperature 1, no top-k/top-p. Reports generated tokens per second (the
median of `--repeat` timed runs after one warm-up; the engine built once, outside the timing), and
the sampler/trainer gap: max |log-prob of the engine's sampler - the trainer's forward| over the
generated tokens. Appended to bench/results/rollout.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import append_csv, device_name, git_revision, sync, today
from e2e import workload
from fastppo.data import encode_prompts, read_jsonl
from fastppo.kernels import token_logprobs
from fastppo.models import lm_logits, load_lm
from fastppo.rollout import Sampling
from fastppo.rollout.hf import HFRollout

WORKLOADS = {"e2e": (16, 32), "large": (256, 128)}  # prompts, new tokens


def engine(kind: str, policy: Path, lm, new_tokens: int, rows: int, device: str):
    sampling = Sampling(max_new_tokens=new_tokens)
    if kind == "hf":
        return HFRollout(lm, sampling, eos_id=3, pad_id=0, device=device, seed=0)
    from fastppo.rollout.vllm import VLLMRollout
    return VLLMRollout(policy, sampling, eos_id=3, pad_id=0, device=device, seed=0,
                       dtype="float32", max_model_len=16 + new_tokens, max_rows=rows)


@torch.no_grad()
def gap(lm, batch) -> float:
    """max |sampler log-prob - trainer log-prob| over the generated tokens (forward in chunks)."""
    worst = 0.0
    for i in range(0, batch.input_ids.shape[0], 16):
        mb = batch.select(slice(i, i + 16))
        labels = mb.responses.masked_fill(~mb.response_mask, -100)
        lp = token_logprobs(lm_logits(lm, mb.input_ids, mb.attention_mask, mb.response_positions),
                            labels)
        worst = max(worst, (lp - mb.sampler_logprobs)[mb.response_mask].abs().max().item())
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        policy, _, prompts_file = workload(Path(tmp), seed=0)
        lm = load_lm(policy, args.device).eval()
        from transformers import AutoTokenizer
        base = encode_prompts(AutoTokenizer.from_pretrained(policy),
                              [r["prompt"] for r in read_jsonl(prompts_file, "ppo")])
        for name in args.workloads:
            n, new_tokens = WORKLOADS[name]
            prompts = [base[i % len(base)] for i in range(n)]
            for kind in args.engines:
                rollout = engine(kind, policy, lm, new_tokens, n, args.device)
                rollout.generate(prompts, iteration=0)  # warm-up
                times, tokens = [], 0
                for r in range(args.repeat):
                    sync(args.device)
                    start = time.perf_counter()
                    batch = rollout.generate(prompts, iteration=r + 1)
                    sync(args.device)
                    times.append(time.perf_counter() - start)
                    tokens = int(batch.response_mask.sum())
                seconds = statistics.median(times)
                row = dict(date=today(), rev=git_revision(), device=device_name(args.device),
                           torch=torch.__version__, engine=kind, workload=f"{n}x{new_tokens}",
                           repeat=args.repeat, tokens=tokens, seconds=f"{seconds:.4f}",
                           tokens_per_s=f"{tokens / seconds:.1f}", sampler_gap_max=f"{gap(lm, batch):.3e}")
                print(", ".join(f"{k} {v}" for k, v in row.items() if k not in ("date", "rev")))
                rows.append(row)
                del rollout
    append_csv("rollout.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
