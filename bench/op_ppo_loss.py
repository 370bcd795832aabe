"""ppo_loss benchmark, run by bench/ops.py: the clipped policy loss, clipped value loss (vf_coef 0.1,
value_clip 0.2) and entropy bonus (0.01) at temperature 0.7, reduced to the masked mean.

Inputs: the token_logprobs benchmark's logits and labels (common.random_logits, seed 0; each of
--rows x --vocab that fits in --max-logit-bytes) viewed as 8 sequences of N/8 tokens (1 when 8 does
not divide N); per token: old logprobs (the reference's at temperature 0.7, plus 0.1 x noise),
advantages, values, old values and returns (standard normal), mask all true. Backward differentiates
the loss with respect to the logits and the values.
Byte floor, b bytes per logit (the per-token tensors are negligible beside the logits):
    fwd N*V*b (read the logits once)   bwd 2*N*V*b (read them again, write their gradient)
    fwd+bwd 3*N*V*b
Providers: fastppo-triton (CUDA), fastppo-native (CPU), fastppo-torch (the chunked reference),
seed-literal (the seed article: actor -mean(A * p / p_old), critic mean((V - R)^2) / 2), eager
(log_softmax, entropy, clipped ratio and value in separate passes, as peer trainers write it),
compile (torch.compile of the reference).
"""
from __future__ import annotations

import functools

import torch

from common import Case, logit_shapes, random_logits
from fastppo.kernels import _native as native, ppo_loss, reference

OPS = ("ppo_loss",)
T_SAMPLE = 0.7  # temperature
OPTIONS = dict(clip_eps=0.2, value_clip=0.2, vf_coef=0.1, entropy_coef=0.01, temperature=T_SAMPLE)


def cases(op, args):
    for N, V in logit_shapes(op, args):
        yield _case(N, V, args)


def _case(N, V, args):
    logits, labels = random_logits(N, V, args)
    B = 8 if N % 8 == 0 else 1
    x, y = logits.view(B, N // B, V), labels.view(B, N // B)
    with torch.no_grad():
        lp = reference.token_logprobs(x, y, temperature=T_SAMPLE).float()
    old, adv = lp + 0.1 * torch.randn_like(lp), torch.randn_like(lp)
    mask = torch.ones_like(y, dtype=torch.bool)
    old_values, returns = torch.randn_like(lp), torch.randn_like(lp)
    nvb = N * V * logits.element_size()
    return Case(f"{N}x{V}", {"fwd": nvb, "bwd": 2 * nvb, "fwd+bwd": 3 * nvb},
                lambda: (x.detach().requires_grad_(), torch.randn_like(lp).requires_grad_(), y, old,
                         adv, mask, old_values, returns))


def objective(out):
    """What backward differentiates: the loss itself."""
    return out


def providers(op, device):
    """name -> f(logits, values, labels, old_logprobs, advantages, mask, old_values, returns) -> loss."""
    out = {}

    def fastppo(backend):
        def run(x, values, labels, old, adv, mask, old_values, returns):
            return ppo_loss(x, labels, old, adv, mask, values=values, old_values=old_values,
                            returns=returns, backend=backend, **OPTIONS).loss
        return run
    if device == "cuda":
        out["fastppo-triton"] = fastppo("triton")
    if device == "cpu" and native.available():
        out["fastppo-native"] = fastppo("native")
    out["fastppo-torch"] = fastppo("torch")

    def seed_literal(x, values, labels, old, adv, mask, old_values, returns):
        # actor = -mean(A * new_probs / probs), critic = mean((V - R)^2) / 2
        p = torch.softmax(x.float() / T_SAMPLE, -1).gather(-1, labels[..., None])[..., 0]
        actor = -(adv * p / old.exp())[mask].mean()
        critic = 0.5 * ((values - returns) ** 2)[mask].mean()
        return actor + 0.1 * critic
    out["seed-literal"] = seed_literal

    def eager(x, values, labels, old, adv, mask, old_values, returns):  # separate passes, as peers
        logp = torch.log_softmax(x.float() / T_SAMPLE, -1)
        lp = logp.gather(-1, labels[..., None])[..., 0]
        entropy = -(logp.exp() * logp).sum(-1)
        ratio = torch.exp(lp - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        vc = old_values + (values - old_values).clamp(-0.2, 0.2)
        vf = 0.5 * torch.maximum((values - returns) ** 2, (vc - returns) ** 2)
        return (pg + 0.1 * vf - 0.01 * entropy)[mask].mean()
    out["eager"] = eager

    compiled = torch.compile(functools.partial(reference.ppo_loss, **OPTIONS))
    out["compile"] = lambda x, values, labels, old, adv, mask, old_values, returns: compiled(
        x, labels, old, adv, mask, values=values, old_values=old_values, returns=returns).loss
    return out
