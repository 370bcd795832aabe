"""Op benchmarks: fastppo's backends beside the baselines users would otherwise run, in roofline units.

    python bench/ops.py                       # CPU: float32, the shapes below
    python bench/ops.py --device cuda --dtype bfloat16 --rows 8192 16384 --vocab 151936
    python bench/ops.py --quick               # tiny shapes, a smoke run

Ops: token_logprobs (with and without entropy), ppo_loss, gae. Each provider is timed forward,
backward (the forward untimed before it) and forward+backward: median with 20/80 quantiles of --repeat
runs after a warm-up (CUDA events on a GPU), peak memory of forward+backward, and GB/s against the op's
byte floor, also as a fraction of the machine's measured copy bandwidth:
    token_logprobs, ppo_loss   fwd N*V*b   bwd 2*N*V*b   fwd+bwd 3*N*V*b    (b bytes per logit)
    gae                        fwd B*T*(2*b + 1 + 8)       bwd B*T*(8 + 1 + 8)
Providers, each only where it runs (a missing optional peer is skipped with a note):
    fastppo-triton (CUDA), fastppo-native (CPU), fastppo-torch (the chunked reference),
    seed-literal (the seed article's formulas as written: softmax, then log of the gathered prob),
    eager (log_softmax + gather, Python-loop GAE: as peers write them), compile (torch.compile of the
    reference), trl (trl.trainer.utils, `pip install -e .[bench]`), liger (GPU only).
Rows are appended to bench/results/ops.csv keyed by date, git revision and device.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import sys

import torch

from common import (append_csv, copy_bandwidth_gbps, device_name, git_revision, peak_mib, time_ms,
                    today)
from fastppo.kernels import _native as native, reference
from fastppo.kernels import gae, ppo_loss, token_logprobs

T_SAMPLE = 0.7  # temperature used throughout


# ------------------------------------------------------------------------------ token_logprobs


def token_providers(device, entropy):
    """name -> f(logits, labels) -> logprobs or (logprobs, entropy)."""
    out = {}

    def fastppo(backend):
        return functools.partial(token_logprobs, temperature=T_SAMPLE, return_entropy=entropy,
                                 backend=backend, validate=False)
    if device == "cuda":
        out["fastppo-triton"] = fastppo("triton")
    if device == "cpu" and native.available():
        out["fastppo-native"] = fastppo("native")
    out["fastppo-torch"] = fastppo("torch")

    def seed_literal(x, y):  # the article: probs of the chosen tokens, then their log
        p = torch.softmax(x.float() / T_SAMPLE, -1)
        lp = torch.log(p.gather(-1, y[..., None])[..., 0])
        return (lp, -(p * torch.log(p)).sum(-1)) if entropy else lp
    out["seed-literal"] = seed_literal

    def eager(x, y):
        logp = torch.log_softmax(x.float() / T_SAMPLE, -1)
        lp = logp.gather(-1, y[..., None])[..., 0]
        return (lp, -(logp.exp() * logp).sum(-1)) if entropy else lp
    out["eager"] = eager
    out["compile"] = torch.compile(functools.partial(reference.token_logprobs, temperature=T_SAMPLE,
                                                     return_entropy=entropy))
    try:
        trl_utils = importlib.import_module("trl.trainer.utils")
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(f"note: trl not available ({type(e).__name__}); skipped")
    else:
        if entropy and hasattr(trl_utils, "selective_log_softmax_and_entropy"):
            fused = trl_utils.selective_log_softmax_and_entropy
            out["trl"] = lambda x, y: fused(x / T_SAMPLE, y)
        elif entropy:
            out["trl"] = lambda x, y: (trl_utils.selective_log_softmax(x / T_SAMPLE, y),
                                       trl_utils.entropy_from_logits(x / T_SAMPLE))
        else:
            out["trl"] = lambda x, y: trl_utils.selective_log_softmax(x / T_SAMPLE, y)
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
        except Exception as e:  # noqa: BLE001
            print(f"note: liger-kernel not available ({type(e).__name__}); skipped")
        else:
            if not entropy:  # Liger's cross entropy is -logprob per token; it has no entropy
                out["liger"] = lambda x, y: -liger_cross_entropy(
                    (x / T_SAMPLE).view(-1, x.shape[-1]), y.view(-1), reduction="none").view(y.shape)
    else:
        print("note: liger-kernel runs on GPUs only; skipped")
    return out


def objective(out):
    return out[0].sum() + 0.1 * out[1].sum() if isinstance(out, tuple) else out.sum()


# ------------------------------------------------------------------------------------ ppo_loss


def ppo_providers(device, batch):
    opts = dict(values=None, clip_eps=0.2, value_clip=0.2, vf_coef=0.1, entropy_coef=0.01,
                temperature=T_SAMPLE)
    out = {}

    def fastppo(backend):
        def run(x, values):
            return ppo_loss(x, batch["labels"], batch["old"], batch["adv"], batch["mask"],
                            **dict(opts, values=values), old_values=batch["old_values"],
                            returns=batch["returns"], backend=backend).loss
        return run
    if device == "cuda":
        out["fastppo-triton"] = fastppo("triton")
    if device == "cpu" and native.available():
        out["fastppo-native"] = fastppo("native")
    out["fastppo-torch"] = fastppo("torch")

    def seed_literal(x, values):  # actor = -mean(A * new_probs / probs), critic = mean((V - R)^2) / 2
        p = torch.softmax(x.float() / T_SAMPLE, -1).gather(-1, batch["labels"][..., None])[..., 0]
        m = batch["mask"]
        actor = -(batch["adv"] * p / batch["old"].exp())[m].mean()
        critic = 0.5 * ((values - batch["returns"]) ** 2)[m].mean()
        return actor + 0.1 * critic
    out["seed-literal"] = seed_literal

    def eager(x, values):  # separate passes, as peer trainers write it
        logp = torch.log_softmax(x.float() / T_SAMPLE, -1)
        lp = logp.gather(-1, batch["labels"][..., None])[..., 0]
        entropy = -(logp.exp() * logp).sum(-1)
        ratio = torch.exp(lp - batch["old"])
        adv, m = batch["adv"], batch["mask"]
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        vc = batch["old_values"] + (values - batch["old_values"]).clamp(-0.2, 0.2)
        vf = 0.5 * torch.maximum((values - batch["returns"]) ** 2, (vc - batch["returns"]) ** 2)
        return (pg + 0.1 * vf - 0.01 * entropy)[m].mean()
    out["eager"] = eager

    compiled = torch.compile(functools.partial(reference.ppo_loss, temperature=T_SAMPLE,
                                               clip_eps=0.2, value_clip=0.2, vf_coef=0.1,
                                               entropy_coef=0.01))
    out["compile"] = lambda x, values: compiled(
        x, batch["labels"], batch["old"], batch["adv"], batch["mask"], values=values,
        old_values=batch["old_values"], returns=batch["returns"]).loss
    return out


# ----------------------------------------------------------------------------------------- gae


def gae_providers(device):
    out = {}
    if device == "cuda":
        out["fastppo-triton"] = functools.partial(gae, gamma=1.0, lam=0.95, backend="triton")
    if device == "cpu" and native.available():
        out["fastppo-native"] = functools.partial(gae, gamma=1.0, lam=0.95, backend="native")
    out["fastppo-torch"] = functools.partial(gae, gamma=1.0, lam=0.95, backend="torch")

    def eager_loop(rewards, values, mask):  # the usual trainer loop (right padding assumed)
        last, advs = 0.0, []
        rewards, values = rewards * mask, values * mask
        for t in reversed(range(rewards.shape[1])):
            next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
            last = rewards[:, t] + next_v - values[:, t] + 0.95 * last
            advs.append(last)
        adv = torch.stack(advs[::-1], 1)
        return adv, adv + values
    out["eager"] = eager_loop
    return out


# -------------------------------------------------------------------------------------- driver


def measure(name, make_inputs, run, backward_of, floor, device, repeat, modes=("fwd", "bwd", "fwd+bwd")):
    """Times run(*inputs) in each mode; returns a dict of results."""
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
                             setup=lambda: backward_of(run(*inputs)))
    if grads and "fwd+bwd" in modes:
        def both():
            torch.autograd.grad(backward_of(run(*inputs)), grads)
        res["fwd+bwd"] = time_ms(both, device, repeat=repeat)
        res["peak"] = peak_mib(both, device)
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--gae", type=str, nargs="+", default=["64x1024", "8x8192"],
                        help="BxT shapes for gae")
    parser.add_argument("--ops", nargs="+", default=["token_logprobs", "token_logprobs+entropy",
                                                      "ppo_loss", "gae"])
    parser.add_argument("--only", nargs="*", help="provider names (default: all)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-logit-bytes", type=float, default=1.2e9,
                        help="skip token shapes whose logits exceed this (CPU memory)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--csv", default="ops.csv", help="file name under bench/results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.vocab, args.gae, args.repeat = [64], [1000], ["4x64"], 2
    device, dtype = args.device, getattr(torch, args.dtype)
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
        if op.startswith("token_logprobs") or op == "ppo_loss":
            for N in args.rows:
                for V in args.vocab:
                    b = torch.finfo(dtype).bits // 8
                    if N * V * b > args.max_logit_bytes:
                        print(f"  {op}: N={N} V={V} skipped (logits exceed --max-logit-bytes)")
                        continue
                    g = torch.Generator().manual_seed(0)
                    logits = (torch.randn(N, V, generator=g) * 2).to(device=device, dtype=dtype)
                    labels = torch.randint(0, V, (N,), generator=g).to(device)
                    floors = {"fwd": N * V * b, "bwd": 2 * N * V * b, "fwd+bwd": 3 * N * V * b}
                    shape = f"{N}x{V}"
                    if op == "ppo_loss":
                        B = 8 if N % 8 == 0 else 1
                        x3, y3 = logits.view(B, N // B, V), labels.view(B, N // B)
                        with torch.no_grad():
                            lp = reference.token_logprobs(x3, y3, temperature=T_SAMPLE).float()
                        batch = dict(labels=y3, old=lp + 0.1 * torch.randn_like(lp),
                                     adv=torch.randn_like(lp), mask=torch.ones_like(y3, dtype=torch.bool),
                                     old_values=torch.randn_like(lp), returns=torch.randn_like(lp))
                        providers = ppo_providers(device, batch)
                        make = lambda: (x3.detach().requires_grad_(),  # noqa: E731
                                        torch.randn_like(lp).requires_grad_())
                        back = lambda loss: loss  # noqa: E731
                    else:
                        providers = token_providers(device, op.endswith("entropy"))
                        make = lambda: (logits.detach().requires_grad_(), labels)  # noqa: E731
                        back = objective
                    for name, run in providers.items():
                        if args.only and name not in args.only:
                            continue
                        record(op, name, shape, measure(name, make, run, back, floors, device,
                                                        args.repeat), floors)
                    del logits
        elif op == "gae":
            for spec in args.gae:
                B, T = map(int, spec.split("x"))
                g = torch.Generator().manual_seed(0)
                rewards = torch.randn(B, T, generator=g).to(device)
                values = torch.randn(B, T, generator=g).to(device)
                mask = torch.ones(B, T, dtype=torch.bool, device=device)
                floors = {"fwd": B * T * 17, "bwd": B * T * 17, "fwd+bwd": B * T * 34}
                make = lambda: (rewards.clone().requires_grad_(),  # noqa: E731
                                values.clone().requires_grad_(), mask)
                for name, run in gae_providers(device).items():
                    if args.only and name not in args.only:
                        continue
                    record("gae", name, spec, measure(name, make, run, lambda o: o[0].sum() + o[1].sum(),
                                                      floors, device, max(2, args.repeat // 2)), floors)
        else:
            parser.error(f"unknown op {op!r}")
    path = append_csv(args.csv, rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
