"""linear_token_logprobs benchmark, run by bench/ops.py: log-probs (and 0.1 x the entropy) of the
chosen tokens at temperature 0.7 straight from hidden states and the LM head's weight, against the
LM head's matmul followed by the logits ops.

Inputs: hidden (N, H) and weight (V, H) of --dtype (standard normal, the weight scaled by
2/sqrt(H)), labels uniform in [0, V), for each of --rows x --hidden-size x --vocab whose (N, V)
float32 logits fit in --max-logit-bytes (the baselines materialise them). A run at these sizes is
seconds to minutes on a CPU: pass --repeat 3 or 1. Backward differentiates
sum(logprobs) + 0.1 * sum(entropy) with respect to hidden and weight.
Floors, b bytes per element: the op must read hidden and weight once per matmul and write their
gradients; FLOPs: 2 N H V per matmul, 3 matmuls forward+backward for the unfused LM head (forward,
d hidden, d weight) and 4 for linear_token_logprobs (it recomputes each chunk's logits in backward).
    bytes: fwd (N + V) H b   bwd 2 (N + V) H b   fwd+bwd 3 (N + V) H b
Peak memory (fwd+bwd) includes the gradients every provider returns, d hidden and d weight
((N + V) H b): subtract them for the working memory; the (N, V) float32 logits are 4 N V bytes.
Providers: fastppo-native (CPU) / fastppo-triton (CUDA), fastppo-torch (the chunked reference),
matmul+native / matmul+triton (the LM head's matmul, then fastppo's token_logprobs on the logits),
eager (matmul, log_softmax, gather), compile (torch.compile of matmul + the reference).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from common import Case
from fastppo.kernels import _native as native, linear_token_logprobs, reference, token_logprobs

OPS = ("linear_token_logprobs",)
T_SAMPLE = 0.7


def add_arguments(parser):
    parser.add_argument("--hidden-size", type=int, nargs="+", default=[1024],
                        help="linear_token_logprobs: the hidden sizes H")


def cases(op, args):
    b = torch.finfo(getattr(torch, args.dtype)).bits // 8
    sizes = [64] if args.quick else args.hidden_size
    for N in args.rows:
        for H in sizes:
            for V in args.vocab:
                if N * V * 4 > args.max_logit_bytes:
                    print(f"  {op}: N={N} V={V} skipped (logits exceed --max-logit-bytes)")
                    continue
                floor = (N + V) * H * b
                yield Case(f"{N}x{H}x{V}", {"fwd": floor, "bwd": 2 * floor, "fwd+bwd": 3 * floor},
                           functools.partial(_inputs, N, H, V, args))


def _inputs(N, H, V, args):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(N, H, generator=g).to(device=args.device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(device=args.device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(args.device)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def objective(out):
    return out[0].sum() + 0.1 * out[1].sum()


def providers(op, device):
    out = {}

    def fused(backend):
        return functools.partial(linear_token_logprobs, temperature=T_SAMPLE, return_entropy=True,
                                 validate=False, backend=backend)

    def unfused(backend):
        def run(h, w, y):
            return token_logprobs(F.linear(h, w), y, temperature=T_SAMPLE, return_entropy=True,
                                  validate=False, backend=backend)
        return run
    if device == "cuda":
        out["fastppo-triton"] = fused("triton")
        out["matmul+triton"] = unfused("triton")
    if device == "cpu" and native.available():
        out["fastppo-native"] = fused("native")
        out["matmul+native"] = unfused("native")
    out["fastppo-torch"] = fused("torch")

    def eager(h, w, y):
        logp = torch.log_softmax(F.linear(h, w).float() / T_SAMPLE, -1)
        return logp.gather(-1, y[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
    out["eager"] = eager
    out["compile"] = torch.compile(lambda h, w, y: reference.token_logprobs(
        F.linear(h, w), y, temperature=T_SAMPLE, return_entropy=True))
    return out
