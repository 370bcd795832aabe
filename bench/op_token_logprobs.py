"""token_logprobs benchmark, run by bench/ops.py: the chosen tokens' log-probabilities at temperature
0.7, without ("token_logprobs") and with the entropy ("token_logprobs+entropy").

Inputs: logits (N, V) of --dtype, 2 * standard normal, for each of --rows x --vocab that fits in
--max-logit-bytes, and labels uniform in [0, V) (common.random_logits, seed 0). Backward
differentiates sum(logprobs) (+ 0.1 * sum(entropy)) with respect to the logits.
Byte floor, b bytes per logit (labels and the (N,) outputs are negligible beside the logits):
    fwd N*V*b (read the logits once)   bwd 2*N*V*b (read them again, write their gradient)
    fwd+bwd 3*N*V*b
Providers, each only where it runs (a missing optional peer is skipped with a note):
    fastppo-triton (CUDA), fastppo-native (CPU), fastppo-torch (the chunked reference),
    seed-literal (the seed article: softmax, then the log of the gathered probability),
    eager (log_softmax + gather, as peers write it), compile (torch.compile of the reference),
    trl (trl.trainer.utils), liger (liger_cross_entropy; GPU only, no entropy).
"""
from __future__ import annotations

import functools
import importlib

import torch

from common import Case, logit_shapes, random_logits
from fastppo.kernels import _native as native, reference, token_logprobs

OPS = ("token_logprobs", "token_logprobs+entropy")
T_SAMPLE = 0.7  # temperature


def cases(op, args):
    for N, V in logit_shapes(op, args):
        yield _case(N, V, args)


def _case(N, V, args):
    logits, labels = random_logits(N, V, args)
    nvb = N * V * logits.element_size()
    return Case(f"{N}x{V}", {"fwd": nvb, "bwd": 2 * nvb, "fwd+bwd": 3 * nvb},
                lambda: (logits.detach().requires_grad_(), labels))


def objective(out):
    """What backward differentiates: the logprobs' sum, plus 0.1 x the entropy's."""
    return out[0].sum() + 0.1 * out[1].sum() if isinstance(out, tuple) else out.sum()


def providers(op, device):
    """name -> f(logits, labels) -> logprobs, or (logprobs, entropy) for token_logprobs+entropy."""
    entropy = op.endswith("+entropy")
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
