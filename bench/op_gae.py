"""gae benchmark, run by bench/ops.py: generalized advantage estimation (gamma 1, lambda 0.95) of
float32 rewards and values, returning advantages and returns.

Inputs: rewards and values (B, T), standard normal (seed 0), mask all true, for each BxT of --gae
(4x64 with --quick). Backward differentiates sum(advantages) + sum(returns) with respect to the
rewards and the values. Timed over max(2, --repeat // 2) runs (the Python loop is slow).
Byte floor (float32, a bool mask):
    fwd B*T*17 (read rewards, values 2*4 and the mask 1; write advantages, returns 2*4)
    bwd B*T*17 (read the two output gradients 8 and the mask 1; write the two input gradients 8)
    fwd+bwd B*T*34
Providers: fastppo-triton (CUDA), fastppo-native (CPU), fastppo-torch, eager (the Python loop over
time steps that trainers write).
"""
from __future__ import annotations

import functools

import torch

from common import Case
from fastppo.kernels import _native as native, gae

OPS = ("gae",)


def add_arguments(parser):
    parser.add_argument("--gae", type=str, nargs="+", default=["64x1024", "8x8192"],
                        help="BxT shapes for gae")


def cases(op, args):
    for spec in ["4x64"] if args.quick else args.gae:
        B, T = map(int, spec.split("x"))
        yield _case(spec, B, T, args)


def _case(spec, B, T, args):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(B, T, generator=g).to(args.device)
    values = torch.randn(B, T, generator=g).to(args.device)
    mask = torch.ones(B, T, dtype=torch.bool, device=args.device)
    return Case(spec, {"fwd": B * T * 17, "bwd": B * T * 17, "fwd+bwd": B * T * 34},
                lambda: (rewards.clone().requires_grad_(), values.clone().requires_grad_(), mask),
                repeat=max(2, args.repeat // 2))


def objective(out):
    """What backward differentiates: sum(advantages) + sum(returns)."""
    return out[0].sum() + out[1].sum()


def providers(op, device):
    """name -> f(rewards, values, mask) -> (advantages, returns)."""
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
