"""The top-k / top-p kept set of each row of logits, as one threshold per row.

    kept_v  <=>  x_v >= tau      (tau: one of the row's own logits; -inf where nothing is cut)

where the kept set is `reference.truncation_mask(x / T, top_k, top_p)` (temperature first, then
top-k, then top-p; evaluated in float64): the set a top-k / top-p sampler draws from, and the one
token_logprobs / ppo_loss score with the same top_k / top_p. A sampler that filters with this
threshold and a trainer that scores with those ops agree on the kept set by construction.

Cost: "native" and "triton" find tau with a selection pass (no sort of the vocabulary): a few reads of
each row. "torch" is the reference's sort, for checking.
"""
from __future__ import annotations

import torch

from fastppo.kernels._checks import check_positive, check_tensor, resolve_backend, FLOAT_DTYPES
from fastppo.kernels._layout import as_outer_inner
from fastppo.kernels._truncation import check_truncation, reference_thresholds, thresholds


def truncation_threshold(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """tau per row of `logits`: the row's kept set under top_k / top_p at `temperature` is
    {v : logits[..., v] >= tau} (a NaN logit is never cut: it carries through what reads the row).

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 too, on "torch"); any strides.
        temperature: > 0; the kept set is that of softmax(logits / temperature).
        top_k: keep every logit >= the k-th largest (ties kept together); 0: off.
        top_p: then drop a token once the renormalised mass of the kept tokens strictly more likely
            than it reaches p; 1.0: off.
        backend: "triton", "native", "torch" or "auto"; see `fastppo.kernels`.

    Returns:
        float32 of shape logits.shape[:-1], in logit units (before the temperature); -inf in a row
        from which nothing is cut (and everywhere when top_k = 0 and top_p = 1).
    """
    check_tensor("logits", logits, FLOAT_DTYPES, "a floating-point")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1; got {tuple(logits.shape)}")
    temperature = check_positive("temperature", temperature)
    trunc = check_truncation(top_k, top_p)
    backend = resolve_backend(backend, logits.device, native_dtype=logits.dtype)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows = logits.shape[:-1]
    x3 = as_outer_inner(logits)
    labels = torch.zeros(x3.shape[0] * x3.shape[1], dtype=torch.long, device=logits.device)
    if not trunc.cuts(logits.shape[-1]):
        tau = torch.full(labels.shape, float("-inf"), dtype=torch.float32, device=logits.device)
    elif backend == "torch":
        tau = reference_thresholds(x3, labels, -100, temperature, trunc).to(torch.float32)
    else:
        tau = thresholds(x3, labels, -100, temperature, trunc, backend)
    return tau.view(rows)
