"""Op benchmarks: fastppo's backends beside the baselines users would otherwise run, in roofline units.

    python bench/ops.py                       # CPU: float32, the shapes below
    python bench/ops.py --device cuda --dtype bfloat16 --rows 8192 16384 --vocab 151936
    python bench/ops.py --quick               # tiny shapes, a smoke run

This file is the runner; each op's benchmark is the module bench/op_<op>.py (op_token_logprobs.py:
token_logprobs and token_logprobs+entropy; op_ppo_loss.py; op_gae.py), which documents its inputs,
its byte floor and its providers. The runner imports every bench/op_*.py (in name order: --ops
defaults to all their ops in that order), so a new op's benchmark is one new file defining:
    OPS                     the op names it benchmarks (--ops values, the CSV's op column)
    cases(op, args)         yields a common.Case per shape: its label, its byte floor per mode
                            (the bytes the op must move), and a function making fresh inputs
    providers(op, device)   name -> run(*inputs), each provider only where it runs
    objective(out)          the scalar of run's output that backward differentiates
    add_arguments(parser)   optional: its own command-line options (op_gae.py: --gae)
Each provider is timed forward, backward (the forward untimed before it) and forward+backward: median
with 20/80 quantiles of --repeat runs after a warm-up (CUDA events on a GPU), peak memory of
forward+backward, and GB/s against the op's byte floor, also as a fraction of the machine's measured
copy bandwidth. Providers are fastppo's backends (fastppo-triton on CUDA, fastppo-native on CPU,
fastppo-torch) and, per op, the seed article's formulas (seed-literal), eager PyTorch as peers write
it, torch.compile of the reference, TRL (`pip install -e .[bench]`) and Liger (GPU only); a missing
optional peer is skipped with a note. Timing, memory and the run's labels come from bench/common.py.
Rows are appended to bench/results/ops.csv keyed by date, git revision and device.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from common import append_csv, copy_bandwidth_gbps, device_name, git_revision, peak_mib, time_ms, today


def discover():
    """op name -> its benchmark module, from bench/op_*.py in name order."""
    modules = {}
    for path in sorted(Path(__file__).parent.glob("op_*.py")):
        module = importlib.import_module(path.stem)
        for op in module.OPS:
            modules[op] = module
    return modules


def measure(make_inputs, run, objective, device, repeat, modes=("fwd", "bwd", "fwd+bwd")):
    """Times run(*inputs) in each mode, backward differentiating objective(output) with respect to
    the inputs that require grad; returns mode -> (median, p20, p80) ms, and "peak" -> MiB."""
    res = {}
    inputs = make_inputs()
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if "fwd" in modes:
        def fwd():
            with torch.no_grad():
                run(*inputs)
        res["fwd"] = time_ms(fwd, device, repeat=repeat)
    if grads and "bwd" in modes:
        res["bwd"] = time_ms(lambda loss: torch.autograd.grad(loss, grads), device, repeat=repeat,
                             setup=lambda: objective(run(*inputs)))
    if grads and "fwd+bwd" in modes:
        def both():
            torch.autograd.grad(objective(run(*inputs)), grads)
        res["fwd+bwd"] = time_ms(both, device, repeat=repeat)
        res["peak"] = peak_mib(both, device)
    return res


def main(argv=None):
    modules = discover()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    for module in dict.fromkeys(modules.values()):
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    parser.add_argument("--ops", nargs="+", default=list(modules),
                        help=f"ops to run, of {' '.join(modules)} (default: all)")
    parser.add_argument("--only", nargs="*", help="provider names (default: all)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-logit-bytes", type=float, default=1.2e9,
                        help="skip token shapes whose logits exceed this (CPU memory)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--csv", default="ops.csv",
                        help="file name under bench/results/, or a path with a folder")
    args = parser.parse_args(argv)
    for op in args.ops:
        if op not in modules:
            parser.error(f"unknown op {op!r} (known: {', '.join(modules)})")
    if args.quick:  # the ops' own shape options read args.quick
        args.rows, args.vocab, args.repeat = [64], [1000], 2
    device = args.device
    copy_bw = copy_bandwidth_gbps(device, 64 if args.quick else 512)
    meta = dict(date=today(), rev=git_revision(), device=device_name(device), torch=torch.__version__)
    print(f"{meta['device']}, torch {meta['torch']}, copy bandwidth {copy_bw:.1f} GB/s (read+write)")
    rows = []

    def record(op, provider, shape, res, floors):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            if mode not in res:
                continue
            med, p20, p80 = res[mode]
            gbps = floors[mode] / (med / 1e3) / 1e9
            rows.append(dict(meta, op=op, provider=provider, shape=shape, dtype=args.dtype, mode=mode,
                             median_ms=f"{med:.3f}", p20_ms=f"{p20:.3f}", p80_ms=f"{p80:.3f}",
                             peak_mib=f"{res.get('peak', float('nan')):.1f}" if mode == "fwd+bwd" else "",
                             floor_bytes=int(floors[mode]), gbps=f"{gbps:.2f}",
                             frac_copy_bw=f"{gbps / copy_bw:.3f}"))
            peak = f" peak {res['peak']:.0f} MiB" if mode == "fwd+bwd" and "peak" in res else ""
            print(f"  {op:24} {provider:15} {shape:14} {mode:8} {med:9.2f} ms [{p20:.2f}-{p80:.2f}] "
                  f"{gbps:7.1f} GB/s ({100 * gbps / copy_bw:5.1f}% of copy){peak}")

    for op in args.ops:
        module = modules[op]
        for case in module.cases(op, args):
            for name, run in module.providers(op, device).items():
                if args.only and name not in args.only:
                    continue
                res = measure(case.inputs, run, module.objective, device, case.repeat or args.repeat)
                record(op, name, case.shape, res, case.floors)
            del case  # free this shape's inputs before the next one is made
    path = append_csv(args.csv, rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
