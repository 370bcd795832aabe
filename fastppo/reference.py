"""Plain-PyTorch references of every fused op in `fastppo.kernels`.

Each function reads like the math it computes and is correct in float64. Tests compare the kernels
against these, benchmarks use them as the baseline, and the `"torch"` backend evaluates them in chunks
(`fastppo.chunked`) where no faster kernel exists. Half-precision inputs are computed in float32;
float64 inputs stay float64 so the references can serve as ground truth.
"""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (ground truth); every other floating dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logprob_t = log softmax(logits_t / T)[label_t];  entropy_t = -sum_v p_tv log p_tv.

    Positions whose label is `ignore_index` give 0 for both, with zero gradient.
    """
    z = logits.to(compute_dtype(logits)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    index = torch.where(keep, labels, 0).long().unsqueeze(-1)
    logprobs = torch.where(keep, logp.gather(-1, index).squeeze(-1), 0.0)
    if not return_entropy:
        return logprobs
    p = logp.exp()
    # 0 * log 0 = 0 for banned (-inf) tokens; filling log p, not the product, keeps the gradient finite.
    entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    return logprobs, torch.where(keep, entropy, 0.0)
