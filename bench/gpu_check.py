"""The one-command GPU check: everything fastppo needs a GPU for, in one run of under 10 minutes.

    python bench/gpu_check.py                 # on a GPU machine (make gpu-check)
    python bench/gpu_check.py --dry-run       # what it would run; the parts that need no CUDA
    python bench/gpu_check.py --wheels DIR    # first install missing packages from wheels in DIR

Steps, each a child process with its own time budget (a step that fails or runs out of time is
recorded as such and the next one runs; the budgets add up to 560 s):
  environment  the device, torch/CUDA/Triton versions, the optional packages present (flash-attn,
               vLLM, Liger, TRL, transformers), the copy bandwidth and the bf16 matmul peak measured
               here: the roofline every later figure is a fraction of.
  install      with --wheels DIR: `pip install --no-index --find-links DIR` of the missing ones among
               flash-attn and vLLM (GPU machines here reach no package index; wheels travel with the
               working tree). Without it: skipped, and the steps that need them skip their parts.
  kernels      every Triton kernel compiled on CUDA against the float64 reference: the op test
               suite (tests/ops: each op, float32/bfloat16/float16, top-k/top-p, every view of the
               inputs, values and gradients) with the device as its DEVICE.
  ops          each op timed forward/backward against the copy bandwidth, beside TRL's and Liger's
               where installed, at the published anchor shape (TRL #7244: 8,192 tokens x 151,936
               vocabulary, log-prob + entropy forward 0.89 ms fused on an H100): bench/ops.py in
               bfloat16, rows to bench/results/gpu_ops.csv.
  grpo         a few GRPO iterations at the Qwen2.5-0.5B shape (hidden 896, 24 layers, vocabulary
               151,936; bench/e2e.py's Llama-style model, head_dim 64), bf16, vLLM rollouts where
               installed (else the built-in engine), flash-attn where installed: tokens/s per phase,
               peak memory, the sampler gap, from e2e's rows.
Writes one row per step to bench/results/gpu.csv (date, revision, device, step, status, seconds,
summary) and prints the same as a Markdown table for bench/RESULTS.md. Exit status 0 when every step
that ran passed (skipped steps do not fail the check), 1 otherwise.

--dry-run (automatic without CUDA, e.g. on the 2-core CI machines): the plan (each step's command and
budget), the environment step on the CPU, and a check that every command's script exists and accepts
the options the step passes (its --help lists them): nothing that needs CUDA runs. The suite runs it
(tests/test_bench_results.py), so the check works the first time a GPU is lent.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OPTIONAL = {"flash_attn": "flash-attn", "vllm": "vllm", "liger_kernel": "liger-kernel", "trl": "trl",
            "transformers": "transformers", "triton": "triton"}
ANCHOR_ROWS, ANCHOR_VOCAB = 8192, 151936


@dataclass
class Step:
    name: str
    budget_s: int
    command: list[str] = field(default_factory=list)  # empty: runs in this process
    needs_cuda: bool = True
    why: str = ""


def plan(args, present: dict) -> list[Step]:
    py = sys.executable
    engine = "vllm" if present.get("vllm") else "hf"
    return [
        Step("environment", 20, needs_cuda=False,
             why="device, versions, packages, copy bandwidth and bf16 matmul peak"),
        Step("install", 100, [py, "-m", "pip", "install", "--no-index", "--find-links",
                              str(args.wheels or "WHEELS"), *missing_installable(present)],
             needs_cuda=False, why="missing flash-attn / vLLM from --wheels"),
        Step("kernels", 180, [py, "-m", "pytest", "tests/ops", "-q", "-p", "no:cacheprovider",
                              "-x", "--no-header"],
             why="every Triton kernel compiled on CUDA against the float64 reference"),
        Step("ops", 110, [py, "bench/ops.py", "--device", "cuda", "--dtype", "bfloat16", "--rows",
                          str(ANCHOR_ROWS), "--vocab", str(ANCHOR_VOCAB), "--repeat", "10",
                          "--csv", "gpu_ops.csv"],
             why=f"ops at {ANCHOR_ROWS} x {ANCHOR_VOCAB}, bf16, vs copy bandwidth, TRL, Liger"),
        Step("grpo", 150, [py, "bench/e2e.py", "--device", "cuda", "--dtype", "bfloat16",
                          "--hidden", "896", "--layers", "24", "--vocab", str(ANCHOR_VOCAB),
                          "--advantage_estimator", "grpo", "--samples_per_prompt", "4",
                          "--iterations", "3", "--rollout_engine", engine],
             why=f"GRPO at the Qwen2.5-0.5B shape, bf16, rollouts on {engine}"),
    ]


def missing_installable(present: dict) -> list[str]:
    return [OPTIONAL[m] for m in ("flash_attn", "vllm") if not present.get(m)]


def packages() -> dict:
    """module -> version (None: not installed), without importing the heavy ones."""
    from importlib import metadata

    found = {}
    for module, dist in OPTIONAL.items():
        if importlib.util.find_spec(module) is None:
            found[module] = None
            continue
        try:
            found[module] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[module] = "present"
    return found


def environment(cuda: bool) -> dict:
    """The device and its roofline, measured here (bf16 matmul, copy bandwidth)."""
    import torch

    sys.path.insert(0, str(BENCH))
    from common import copy_bandwidth_gbps, device_name, time_ms

    device = "cuda" if cuda else "cpu"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms, _, _ = time_ms(lambda: a @ b, device, repeat=10 if cuda else 3, warmup=3 if cuda else 1)
    info = {"device": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16_matmul_tflops": round(2 * n ** 3 / ms / 1e9, 2),
            "copy_gbps": round(copy_bandwidth_gbps(device, mib=1024 if cuda else 64), 1)}
    info.update({f"pkg_{k}": v for k, v in packages().items()})
    return info


def check_command(step: Step) -> str | None:
    """Why `step`'s command cannot run as written (its script is missing, or its --help does not
    list an option the step passes), or None. Runs only the --help of bench scripts."""
    if not step.command or step.name == "install":
        return None
    if step.command[1:3] == ["-m", "pytest"]:
        target = ROOT / step.command[3]
        return None if target.is_dir() else f"{target} does not exist"
    script = ROOT / step.command[1]
    if not script.is_file():
        return f"{script} does not exist"
    proc = subprocess.run([step.command[0], str(script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=child_env())
    if proc.returncode:
        return f"{script.name} --help failed: {proc.stderr.strip().splitlines()[-1:]}"
    unknown = [o for o in step.command[2:] if o.startswith("--") and o not in proc.stdout]
    return f"{script.name} does not take {unknown}" if unknown else None


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_step(step: Step) -> tuple[str, str]:
    """(status, summary) of the step's command run within its budget (its process group killed
    when it overruns: nothing is left behind)."""
    proc = subprocess.Popen(step.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env(), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=step.budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return "timeout", f"over its {step.budget_s} s budget; last line: {last_line(output)}"
    return ("ok" if proc.returncode == 0 else "failed"), summary(step.name, output)


def last_line(output: str) -> str:
    lines = [line for line in (output or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def summary(name: str, output: str) -> str:
    """The line of a step's output that says what it measured or found."""
    if name == "kernels":
        found = re.findall(r"\d+ (?:passed|failed|skipped|errors?)[^\n]*", output)
        return found[-1] if found else last_line(output)
    if name == "grpo":
        rows = [line for line in output.splitlines() if "tokens/s" in line or "tokens_per_s" in line]
        return rows[-1][:300] if rows else last_line(output)
    return last_line(output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the plan and the parts that need no CUDA (automatic without CUDA)")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels to install missing packages from")
    parser.add_argument("--steps", nargs="+", help="run only these steps (default: all)")
    parser.add_argument("--csv", default="gpu.csv", help="file name under bench/results/")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    dry = args.dry_run or not cuda
    present = packages()
    steps = [s for s in plan(args, present) if not args.steps or s.name in args.steps]
    print(f"fastppo GPU check ({'dry run: ' + ('asked' if args.dry_run else 'no CUDA device') if dry else 'CUDA'}); "
          f"budget {sum(s.budget_s for s in steps)} s in all")
    sys.path.insert(0, str(BENCH))
    from common import append_csv, git_revision, today

    rows, failed = [], False
    for step in steps:
        start = time.perf_counter()
        if step.name == "environment":
            info = environment(cuda and not dry)
            status, text = "ok", json.dumps(info)
            device = info["device"]
        elif step.name == "install" and not args.wheels:
            status, text = "skipped", (f"no --wheels; missing: {missing_installable(present) or 'none'}")
        elif step.name == "install" and not missing_installable(present):
            status, text = "skipped", "flash-attn and vLLM are installed"
        elif dry and (step.needs_cuda or step.name == "install"):
            problem = check_command(step)
            status = "failed" if problem else "dry"
            text = problem or f"would run ({step.budget_s} s budget): {' '.join(step.command[1:])}"
        else:
            status, text = run_step(step)
        failed |= status in ("failed", "timeout")
        seconds = time.perf_counter() - start
        rows.append(dict(date=today(), rev=git_revision(), device=device, step=step.name,
                         status=status, seconds=f"{seconds:.1f}", budget_s=step.budget_s,
                         summary=text.replace("\n", " ")[:500]))
        print(f"  {step.name:<12} {status:<8} {seconds:6.1f} s  {text[:200]}", flush=True)
    print("\n| step | status | seconds | what it found |\n| --- | --- | ---: | --- |")
    for row in rows:
        print(f"| {row['step']} | {row['status']} | {row['seconds']} | {row['summary'][:160]} |")
    path = append_csv(args.csv, rows)
    print(f"rows appended to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
