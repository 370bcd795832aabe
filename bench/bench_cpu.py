"""CPU benchmark of token_logprobs and ppo_loss: fastppo's native kernels beside the alternatives.

    python bench/bench_cpu.py [--rows 4096] [--vocab 32000] [--repeat 5] [--csv bench/results/cpu.csv]

Providers (float32 logits, temperature 0.7, 10% ignored labels), each with and without the entropy:
  native            fastppo.kernels.token_logprobs(backend="native"), the C++ kernels in csrc/
  native-inplace    the same kernels writing the gradient into the logits (ppo_loss's
                    inplace_backward=True path): no fresh (N, V) gradient buffer to page in
  torch             the chunked reference (backend="torch")
  eager             log_softmax(x / T).gather(...), as peers write it
  compile           torch.compile of fastppo.kernels.reference.token_logprobs
  ppo-native[-inplace]  ppo_loss(backend="native") with values, clipping and an entropy bonus
Each is timed forward only and forward+backward (including the gradient's allocation), median and
20/80 quantiles of --repeat runs after a warm-up. Peak extra memory is the growth of the process's
peak RSS during one forward+backward, minus the gradient buffer (Linux: /proc/self/clear_refs).
Byte floor: forward N*V*4 bytes read; backward N*V*4 read + N*V*4 written.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import _rss_kib, append_csv
from fastppo.kernels import reference
from fastppo.kernels import ppo_loss, token_logprobs
from fastppo.kernels.token_logprobs import NativeTokenLogprobsFunction

T = 0.7


def providers(logits, labels, batch, entropy):
    """name -> (forward(), forward_backward() -> gradient bytes allocated). With entropy, every
    token_logprobs provider also returns the entropy and backpropagates through it."""
    nbytes = logits.numel() * logits.element_size()

    def objective(out):
        return out[0].sum() + 0.1 * out[1].sum() if entropy else out.sum()

    def tl(backend):
        def fwd():
            with torch.no_grad():
                token_logprobs(logits, labels, temperature=T, return_entropy=entropy, backend=backend)

        def fwd_bwd():
            x = logits.detach().requires_grad_()
            out = token_logprobs(x, labels, temperature=T, return_entropy=entropy, backend=backend)
            torch.autograd.grad(objective(out), x)
            return nbytes
        return fwd, fwd_bwd

    def native_inplace():
        scratch = logits.clone()

        def fwd_bwd():
            scratch.copy_(logits)  # (restoring the logits the last run overwrote; untimed below)
            leaf = scratch.detach().requires_grad_()
            t0 = time.perf_counter()
            x = _Alias.apply(leaf)
            lp, ent = NativeTokenLogprobsFunction.apply(x, labels, T, -100, entropy, True)
            torch.autograd.grad(objective((lp, ent) if entropy else lp), x)
            return 0, time.perf_counter() - t0
        return None, fwd_bwd

    def eager():
        def run(x):
            logp = torch.log_softmax(x / T, dim=-1)
            keep = labels != -100
            lp = torch.where(keep, logp.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
            return (lp, -(logp.exp() * logp).sum(-1)) if entropy else lp

        def fwd():
            with torch.no_grad():
                run(logits)

        def fwd_bwd():
            x = logits.detach().requires_grad_()
            torch.autograd.grad(objective(run(x)), x)
            return nbytes
        return fwd, fwd_bwd

    def compiled():
        fn = torch.compile(lambda x: reference.token_logprobs(x, labels, temperature=T,
                                                               return_entropy=entropy))

        def fwd():
            with torch.no_grad():
                fn(logits)

        def fwd_bwd():
            x = logits.detach().requires_grad_()
            torch.autograd.grad(objective(fn(x)), x)
            return nbytes
        return fwd, fwd_bwd

    def ppo(inplace):
        scratch = logits.clone() if inplace else logits

        def run(x):
            values = batch["values"].clone().requires_grad_()
            out = ppo_loss(x, labels.clamp(min=0), batch["old"], batch["adv"], batch["mask"],
                           values=values, old_values=batch["old_values"], returns=batch["returns"],
                           entropy_coef=0.01, temperature=T, backend="native",
                           inplace_backward=inplace)
            return out

        def fwd():
            with torch.no_grad():
                run(logits)

        def fwd_bwd():
            if inplace:
                scratch.copy_(logits)
                leaf = scratch.detach().requires_grad_()
                t0 = time.perf_counter()
                x = _Alias.apply(leaf)
                torch.autograd.grad(run(x).loss, x)
                return 0, time.perf_counter() - t0
            x = logits.detach().requires_grad_()
            torch.autograd.grad(run(x).loss, x)
            return nbytes
        return fwd, fwd_bwd

    found = {
        "native": tl("native"), "native-inplace": native_inplace(), "torch": tl("torch"),
        "eager": eager(), "compile": compiled(),
    }
    if entropy:  # ppo_loss always computes the entropy (it reports it)
        found.update({"ppo-native": ppo(False), "ppo-native-inplace": ppo(True)})
    return found


class _Alias(torch.autograd.Function):
    """A non-leaf tensor sharing the leaf's storage, without being a view of it: stands in for
    logits produced by a model's head (ppo_loss refuses in-place writes into a leaf's storage)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.empty(0, dtype=x.dtype)
        out.set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())
        return out

    @staticmethod
    def backward(ctx, g):
        return g


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        elapsed = time.perf_counter() - t0
        if isinstance(res, tuple):  # (bytes, time measured inside, excluding untimed set-up)
            elapsed = res[1]
        times.append(elapsed)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def peak_extra_mib(fn):
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    res = fn()
    grad_bytes = res[0] if isinstance(res, tuple) else res
    return max(0.0, (_rss_kib("VmHWM") - base) / 1024 - (grad_bytes or 0) / 2**20)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="provider names to run (default: all)")
    parser.add_argument("--entropy", nargs="+", type=lambda v: v == "on", default=[False, True],
                        metavar="on|off", help="with and/or without the entropy (default: both)")
    parser.add_argument("--csv", default=str(Path(__file__).with_name("results") / "cpu.csv"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    N, V = args.rows, args.vocab
    logits = torch.randn(N, V) * 3
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < 0.1] = -100
    batch = dict(old=torch.randn(N) - 10, adv=torch.randn(N), mask=labels != -100,
                 values=torch.randn(N), old_values=torch.randn(N), returns=torch.randn(N))
    logit_mib = N * V * 4 / 2**20
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip() or "unknown"
    machine = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    date = datetime.date.today().isoformat()

    rows = []
    print(f"N={N} V={V} float32, logits {logit_mib:.0f} MiB, {machine}, torch {torch.__version__}")
    print(f"{'provider':20} {'entropy':>7} {'fwd ms':>16} {'fwd+bwd ms':>18} {'peak extra MiB':>15} "
          f"{'% of logits':>12}")
    settings = [(e, n, p) for e in args.entropy for n, p in providers(logits, labels, batch, e).items()]
    for entropy, name, (fwd, fwd_bwd) in settings:
        if args.only and name not in args.only:
            continue
        f = None
        if fwd is not None:
            fwd()  # warm-up (and compilation)
            f = timed(fwd, args.repeat)
        fwd_bwd()
        fb = timed(fwd_bwd, args.repeat)
        peak = peak_extra_mib(fwd_bwd)
        fs = "-" if f is None else f"{f[0] * 1e3:6.1f} [{f[1] * 1e3:.0f}-{f[2] * 1e3:.0f}]"
        print(f"{name:20} {str(entropy):>7} {fs:>16} {fb[0] * 1e3:7.1f} [{fb[1] * 1e3:.0f}-{fb[2] * 1e3:.0f}] "
              f"{peak:15.1f} {100 * peak / logit_mib:11.1f}%")
        rows.append(dict(date=date, rev=rev, machine=machine, torch=torch.__version__, rows=N,
                         vocab=V, provider=name, entropy=entropy,
                         fwd_ms="" if f is None else f"{f[0] * 1e3:.2f}",
                         fwd_bwd_ms=f"{fb[0] * 1e3:.2f}", fwd_bwd_p20_ms=f"{fb[1] * 1e3:.2f}",
                         fwd_bwd_p80_ms=f"{fb[2] * 1e3:.2f}", peak_extra_mib=f"{peak:.1f}"))
    path = append_csv(args.csv, rows)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    sys.exit(main())
