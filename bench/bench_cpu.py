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
Each is timed forward only and forward+backward (including the gradient's allocation; the in-place
providers' restoring copy of the logits runs untimed before each run), median and 20/80 quantiles of
--repeat runs after one warm-up, by bench/common.py's time_ms. Peak extra memory is common.peak_mib of
one forward+backward (the growth of the process's peak RSS, Linux /proc/self/clear_refs) minus the
gradient buffer. Byte floor: forward N*V*4 bytes read; backward N*V*4 read + N*V*4 written.
The CSV's date, rev (git_revision: "-dirty" when tracked files differ from HEAD) and machine
(device_name("cpu")) come from bench/common.py too; bench/ops.py is the wider, per-op benchmark.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import append_csv, device_name, git_revision, peak_mib, time_ms, today
from fastppo.kernels import reference
from fastppo.kernels import ppo_loss, token_logprobs
from fastppo.kernels.token_logprobs import NativeTokenLogprobsFunction

T = 0.7


def providers(logits, labels, batch, entropy):
    """name -> dict(fwd, fwd_bwd, setup, grad_bytes): fwd() (None: not measured), fwd_bwd(), or
    fwd_bwd(setup()) with setup() untimed, and the bytes of the gradient buffer fwd_bwd allocates
    (subtracted from its peak). With entropy, every token_logprobs provider also returns the entropy
    and backpropagates through it."""
    nbytes = logits.numel() * logits.element_size()

    def entry(fwd, fwd_bwd, setup=None, grad_bytes=nbytes):
        return dict(fwd=fwd, fwd_bwd=fwd_bwd, setup=setup, grad_bytes=grad_bytes)

    def objective(out):
        return out[0].sum() + 0.1 * out[1].sum() if entropy else out.sum()

    def inplace_leaf(scratch):
        def setup():  # restores the logits the last run overwrote with its gradient
            scratch.copy_(logits)
            return scratch.detach().requires_grad_()
        return setup

    def tl(backend):
        def fwd():
            with torch.no_grad():
                token_logprobs(logits, labels, temperature=T, return_entropy=entropy, backend=backend)

        def fwd_bwd():
            x = logits.detach().requires_grad_()
            out = token_logprobs(x, labels, temperature=T, return_entropy=entropy, backend=backend)
            torch.autograd.grad(objective(out), x)
        return entry(fwd, fwd_bwd)

    def native_inplace():
        def fwd_bwd(leaf):
            x = _Alias.apply(leaf)
            lp, ent = NativeTokenLogprobsFunction.apply(x, labels, T, -100, entropy, True)
            torch.autograd.grad(objective((lp, ent) if entropy else lp), x)
        return entry(None, fwd_bwd, setup=inplace_leaf(logits.clone()), grad_bytes=0)

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
        return entry(fwd, fwd_bwd)

    def compiled():
        fn = torch.compile(lambda x: reference.token_logprobs(x, labels, temperature=T,
                                                               return_entropy=entropy))

        def fwd():
            with torch.no_grad():
                fn(logits)

        def fwd_bwd():
            x = logits.detach().requires_grad_()
            torch.autograd.grad(objective(fn(x)), x)
        return entry(fwd, fwd_bwd)

    def ppo(inplace):
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

        if inplace:
            def fwd_bwd(leaf):
                x = _Alias.apply(leaf)
                torch.autograd.grad(run(x).loss, x)
            return entry(fwd, fwd_bwd, setup=inplace_leaf(logits.clone()), grad_bytes=0)

        def fwd_bwd():
            x = logits.detach().requires_grad_()
            torch.autograd.grad(run(x).loss, x)
        return entry(fwd, fwd_bwd)

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
    meta = dict(date=today(), rev=git_revision(), machine=device_name("cpu"), torch=torch.__version__)

    rows = []
    print(f"N={N} V={V} float32, logits {logit_mib:.0f} MiB, {meta['machine']}, torch {meta['torch']}")
    print(f"{'provider':20} {'entropy':>7} {'fwd ms':>16} {'fwd+bwd ms':>18} {'peak extra MiB':>15} "
          f"{'% of logits':>12}")
    settings = [(e, n, p) for e in args.entropy for n, p in providers(logits, labels, batch, e).items()]
    for entropy, name, p in settings:
        if args.only and name not in args.only:
            continue
        f = None  # (median, p20, p80) ms; the first run of each is a warm-up (and compilation)
        if p["fwd"] is not None:
            f = time_ms(p["fwd"], "cpu", repeat=args.repeat, warmup=1)
        fb = time_ms(p["fwd_bwd"], "cpu", repeat=args.repeat, warmup=1, setup=p["setup"])
        peak = peak_mib(p["fwd_bwd"], "cpu", setup=p["setup"], exclude_bytes=p["grad_bytes"])
        fs = "-" if f is None else f"{f[0]:6.1f} [{f[1]:.0f}-{f[2]:.0f}]"
        print(f"{name:20} {str(entropy):>7} {fs:>16} {fb[0]:7.1f} [{fb[1]:.0f}-{fb[2]:.0f}] "
              f"{peak:15.1f} {100 * peak / logit_mib:11.1f}%")
        rows.append(dict(meta, rows=N, vocab=V, provider=name, entropy=entropy,
                         fwd_ms="" if f is None else f"{f[0]:.2f}",
                         fwd_bwd_ms=f"{fb[0]:.2f}", fwd_bwd_p20_ms=f"{fb[1]:.2f}",
                         fwd_bwd_p80_ms=f"{fb[2]:.2f}", peak_extra_mib=f"{peak:.1f}"))
    path = append_csv(args.csv, rows)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    sys.exit(main())
