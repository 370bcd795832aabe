"""A soak: many PPO iterations of the standard workload, killed once in the middle and resumed.

    python bench/soak.py [--iterations 300 --kill_at 160 --save_every 25]
    python bench/soak.py --hidden 64 --layers 1 --iterations 6 --kill_at 3 --save_every 2   # smoke, ~20 s
    python bench/soak.py --shape 0.5b --iterations 50 --kill_at 35 --save_every 10

The workload is bench/e2e.py's (Llama-style policy and reward model, hidden 256, 4 layers,
vocabulary 32000; 16 prompts, 32 new tokens, 4 PPO epochs of 2 mini-batches, GAE), run through the
CLI as a user runs it (`python -m fastppo ppo`), a checkpoint every `save_every` iterations:
  1. the run, killed (SIGKILL, its whole process group) once its metrics reach `kill_at`
     iterations, between two checkpoints;
  2. `--resume true` from its last checkpoint to `iterations`;
  3. a reference run without the kill, to `kill_at` + `save_every` iterations.
Checks and reports: every metric of every iteration is finite; the resumed run's iterations equal the
reference's exactly (every metric, bit for bit) from the checkpoint on; resident memory has no upward
trend: the least-squares slope of each iteration's peak RSS (MiB per 100 iterations) over the first
part and over the resumed part, and their first and last values. Rows go to bench/results/soak.csv;
the exit status is 1 when a check fails.

--shape 0.5b: the Qwen2.5-0.5B shape of bench/real_shapes.py instead (random init, tied embeddings,
vocabulary 151,936, responses ending at EOS) as its users train it: GRPO, 4 prompts x 2 samples of
at most 32 new tokens, LoRA rank 16, bf16, top-p 0.95, 1 epoch of 2 mini-batches, its reward
function (no reward model).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import append_csv, device_name, git_revision, today
from e2e import PROMPTS, workload

SKIP = ("time_", "tokens_per_s", "peak_memory", "iteration_memory")  # timings and memory differ


def ppo(policy, rm, prompts, out: Path, iterations: int, args, *extra) -> list[str]:
    common = [sys.executable, "-m", "fastppo", "ppo", "--prompts", str(prompts), "--policy",
              str(policy), "--out", str(out), "--iterations", str(iterations), "--max_new_tokens",
              "32", "--save_every", str(args.save_every), "--seed", "0"]
    if args.shape == "0.5b":  # bench/real_shapes.py's reward function (PYTHONPATH: bench/)
        return common + ["--reward_fn", "real_shapes:reward", "--batch_size", "8",
                         "--samples_per_prompt", "2", "--advantage_estimator", "grpo",
                         "--mini_batch_size", "4", "--ppo_epochs", "1", "--lora_rank", "16",
                         "--dtype", "bfloat16", "--top_p", "0.95", "--kl_in_loss", "true",
                         "--kl_coef", "0.04", "--lr", "1e-5", *extra]
    return common + ["--reward_model", str(rm), "--batch_size", str(PROMPTS), "--mini_batch_size",
                     str(PROMPTS // 2), "--ppo_epochs", "4", *extra]


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl's rows, the last one of each step (a resumed run writes its steps again)."""
    rows = {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def run(command, *, kill_at: int | None = None, out: Path | None = None, timeout: float = 3600):
    """Run `command` (its own process group); with kill_at, SIGKILL the group once out's metrics
    hold that many iterations. Returns the exit status (negative: killed)."""
    bench = str(Path(__file__).resolve().parent)  # real_shapes:reward, for --shape 0.5b
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [bench, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(command[:4])} ran past {timeout:.0f} s")
            if kill_at is not None and len(metrics(out)) >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return proc.returncode
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {proc.stderr.read()[-2000:]}")
    return proc.returncode


def slope(rows: list[dict], key: str) -> float:
    """Least-squares slope of rows[key] against the step, per 100 iterations."""
    xs = [r["step"] for r in rows]
    ys = [r[key] for r in rows]
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def eighth(rows: list[dict], k: int) -> float:
    """The median peak RSS of the k-th eighth of the iterations (the first iteration left out)."""
    part = rows[1:][k * (len(rows) - 1) // 8:(k + 1) * (len(rows) - 1) // 8] or rows[-1:]
    values = sorted(r["peak_memory_mib"] for r in part)
    return values[len(values) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--kill_at", type=int, default=160)
    parser.add_argument("--save_every", type=int, default=25)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shape", choices=["e2e", "0.5b"], default="e2e",
                        help="e2e: bench/e2e.py's workload (--hidden, --layers); 0.5b: the "
                        "Qwen2.5-0.5B shape, LoRA, bf16 (see above)")
    parser.add_argument("--csv", default="soak.csv")
    parser.add_argument("--skip_reference", action="store_true",
                        help="no reference run (the exactness check is skipped)")
    args = parser.parse_args(argv)
    if not 0 < args.kill_at < args.iterations or args.kill_at % args.save_every == 0:
        parser.error("--kill_at must fall between two checkpoints, before --iterations")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.shape == "0.5b":
            from real_shapes import build
            policy, rm, prompts = build(root, "0.5b"), None, root / "prompts.jsonl"
        else:
            policy, rm, prompts = workload(root, 0, args.hidden, args.layers)
        soak, reference = root / "soak", root / "reference"
        start = time.perf_counter()
        status = run(ppo(policy, rm, prompts, soak, args.iterations, args), kill_at=args.kill_at,
                     out=soak)
        before = metrics(soak)
        resumed_from = (len(before) // args.save_every) * args.save_every
        run(ppo(policy, rm, prompts, soak, args.iterations, args, "--resume", "true"))
        seconds = time.perf_counter() - start
        rows = metrics(soak)
        check = args.kill_at + args.save_every
        if not args.skip_reference:
            run(ppo(policy, rm, prompts, reference, check, args))
        ref = [] if args.skip_reference else metrics(reference)
    if status >= 0:
        failures.append("the run ended before the kill")
    if [r["step"] for r in rows] != list(range(args.iterations)):
        failures.append(f"steps {[r['step'] for r in rows][:5]}... are not 0..{args.iterations - 1}")
    bad = [(r["step"], k) for r in rows for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        failures.append(f"non-finite metrics: {bad[:5]}")
    differ = [(a["step"], k) for a, b in zip(rows[resumed_from:check], ref[resumed_from:check])
              for k in a if not k.startswith(SKIP) and a[k] != b.get(k)]
    if differ:
        failures.append(f"the resumed run differs from the reference at {differ[:5]}")
    first, second = rows[1:resumed_from], rows[resumed_from + 1:]  # each part's first: a warm-up
    result = dict(date=today(), rev=git_revision(), device=device_name("cpu"),
                  torch=torch.__version__,
                  workload=f"h{args.hidden}-l{args.layers}" if args.shape == "e2e" else
                  "qwen2.5-0.5b-shape, lora16, bf16, grpo",
                  iterations=args.iterations, killed_after=len(before), resumed_from=resumed_from,
                  seconds=f"{seconds:.0f}",
                  exact_steps="not checked" if args.skip_reference else
                  f"{resumed_from}-{check - 1}" if not differ else "no",
                  rss_first_mib=f"{rows[1]['peak_memory_mib']:.0f}",
                  rss_last_mib=f"{rows[-1]['peak_memory_mib']:.0f}",
                  # the series in eighths (each the median of its stretch): a plateau or a climb
                  rss_eighths_mib=" ".join(f"{eighth(rows, k):.0f}" for k in range(8)),
                  rss_slope_mib_per_100_before=f"{slope(first, 'peak_memory_mib'):.2f}",
                  rss_slope_mib_per_100_after=f"{slope(second, 'peak_memory_mib'):.2f}",
                  tokens_per_s_median=f"{sorted(r['tokens_per_s'] for r in rows)[len(rows) // 2]:.0f}",
                  failures="; ".join(failures) or "none")
    print(", ".join(f"{k} {v}" for k, v in result.items()))
    append_csv(args.csv, [result])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
