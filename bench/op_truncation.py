"""Top-k / top-p truncation benchmark, run by bench/ops.py: token_logprobs with the entropy at
temperature 0.7 under the truncated distribution ("token_logprobs+truncation"), each cut beside the
plain op on the same inputs.

    python bench/ops.py --ops token_logprobs+truncation --rows 4096 --vocab 32000
    python bench/ops.py --ops token_logprobs+truncation --rows 1024 --vocab 151936

Inputs: common.random_logits (2 * standard normal, seed 0); labels are each row's most likely token,
kept by every cut (a sampled token is always in the kept set). Backward differentiates
sum(logprobs) + 0.1 * sum(entropy).
Byte floor: the plain op's, fwd N*V*b, bwd 2*N*V*b: a truncated op must also find each row's
threshold, which the floor does not count; its cost shows as a lower fraction of the floor.
Providers (fastppo-native on CPU, fastppo-triton on CUDA; not the reference, which sorts V):
    <backend>            the plain op (top_k=0, top_p=1.0)
    <backend>:k50        top_k=50
    <backend>:p0.9       top_p=0.9
    <backend>:k50,p0.9   both
"""
from __future__ import annotations

import functools

from common import Case, logit_shapes, random_logits
from fastppo.kernels import _native as native, token_logprobs

OPS = ("token_logprobs+truncation",)
T_SAMPLE = 0.7
CUTS = {"": (0, 1.0), ":k50": (50, 1.0), ":p0.9": (0, 0.9), ":k50,p0.9": (50, 0.9)}


def cases(op, args):
    for N, V in logit_shapes(op, args):
        logits, _ = random_logits(N, V, args)
        labels = logits.argmax(-1)
        nvb = N * V * logits.element_size()
        yield Case(f"{N}x{V}", {"fwd": nvb, "bwd": 2 * nvb, "fwd+bwd": 3 * nvb},
                   lambda logits=logits, labels=labels: (logits.detach().requires_grad_(), labels))


def objective(out):
    return out[0].sum() + 0.1 * out[1].sum()


def providers(op, device):
    backends = []
    if device == "cuda":
        backends.append("fastppo-triton")
    if device == "cpu" and native.available():
        backends.append("fastppo-native")
    return {f"{name}{cut}": functools.partial(token_logprobs, temperature=T_SAMPLE, top_k=k,
                                              top_p=p, return_entropy=True, validate=False,
                                              backend=name.removeprefix("fastppo-"))
            for name in backends for cut, (k, p) in CUTS.items()}
