"""fastppo's kernels inside verl: log-probs and entropies from logits, and a "fastppo" policy loss.

    import fastppo.integrations.verl as fastppo_verl
    fastppo_verl.patch()    # before verl builds its engines (they capture the entropy function),
                            # in every process that trains: verl's Ray workers (e.g. a worker's
                            # setup hook), not only the driver
    # and, to use fastppo's PPO-clip definition: actor.policy_loss.loss_mode=fastppo

What `patch()` replaces (tested with verl 0.9.1; other versions get a warning, not a failure), in
`verl.utils.torch_functional` and every verl module that bound the name:
- `logprobs_from_logits(logits, labels, inplace_backward=True)` -> `fastppo.kernels.token_logprobs`.
  verl divides the logits by the temperature before calling it (its engines do), so the replacement
  applies none. Output dtype as verl's: float32 where verl would take flash-attn's cross-entropy
  kernel, else the logits' dtype (its torch path). `inplace_backward` is accepted: fastppo's kernel
  never writes into the logits (it allocates the gradient).
- `entropy_from_logits(logits)` (the logits' dtype) and `entropy_from_logits_with_chunking(logits,
  chunk_size)` (float32): the kernel's entropy, one pass over the logits.
verl's engines wrap the entropy function in `torch.compile` when `use_torch_compile` is on: patch
before building them. The fused-kernel paths that start from hidden states (`use_fused_kernels`,
verl's own Triton kernel, CUDA only) are not replaced.

`patch()` also registers a policy loss named "fastppo" (verl's `register_policy_loss` registry) with
verl's "vanilla" semantics: ratio = exp(clamp(lp - old_lp, ±20)), PPO-clip with
`clip_ratio_low`/`clip_ratio_high`, the dual clip at `clip_ratio_c` (always on where A < 0, as in verl),
`rollout_is_weights` on each token's term, every `loss_agg_mode` with `global_batch_info` (dp_size,
batch_num_tokens, global_batch_size, loss_scale_factor), and verl's metrics (`actor/pg_clipfrac`,
`actor/ppo_kl` of the clamped log-ratio, `actor/pg_clipfrac_lower`). The per-token PPO term and the
reductions are fastppo's (`fastppo.kernels.reference.ppo_loss_from_logprobs`, the definition every
fastppo kernel is tested against), computed in float32 (float64 for float64 inputs); one deliberate
difference: a micro-batch without a valid token gives 0, where verl's token-mean gives NaN (0 / 0).
The loss works on log-probs verl has already computed, so it adds no speed: its point is one PPO
definition shared with fastppo.
"""
from __future__ import annotations

import os
import sys

import torch

from fastppo.integrations import _patching
from fastppo.integrations._patching import Patcher
from fastppo.kernels import reference

TESTED = ">=0.9,<0.10"
LOSS_NAME = "fastppo"
_patcher = Patcher("verl", "verl", TESTED, extra="verl")
_registered: list[dict] = []


def _verl_logprob_dtype(logits) -> torch.dtype:
    """verl's dispatcher: flash-attn's cross-entropy (float32 out) when importable and not disabled,
    else its torch path, which keeps the logits' dtype."""
    functional = sys.modules["verl.utils.torch_functional"]
    flash = getattr(functional, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)  # verl's spelling
    if flash and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1":
        return torch.float32
    return logits.dtype


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's `logprobs_from_logits` on fastppo's kernel: log_softmax(logits)[labels] (the caller
    has applied the temperature)."""
    del inplace_backward
    logprobs, _ = _patching.logprobs_entropy(logits, labels, backend=_patcher.backend)
    return logprobs.to(_verl_logprob_dtype(logits))


def entropy_from_logits(logits):
    """verl's `entropy_from_logits` on fastppo's kernel, in the logits' dtype."""
    return _patching.entropy(logits, backend=_patcher.backend).to(logits.dtype)


def entropy_from_logits_with_chunking(logits, chunk_size=2048):
    """verl's chunked entropy on fastppo's kernel (which streams every row): float32, as verl's."""
    del chunk_size
    return _patching.entropy(logits, backend=_patcher.backend).float()


def _reduction(loss_agg_mode, mask, dp_size=1, batch_num_tokens=None, global_batch_size=None,
               loss_scale_factor=None):
    """verl's `agg_loss` modes as (fastppo reduction, scale): loss = scale * fastppo-reduced loss."""
    rows_with_any = (mask.sum(-1) > 0).sum()
    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-sum":
            return "sum", dp_size
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs batch_num_tokens "
                                 "(the global token count) in global_batch_info")
            batch_num_tokens = mask.sum().clamp(min=1)
        return "sum", dp_size / batch_num_tokens
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs "
                                 "global_batch_size in global_batch_info")
            global_batch_size = rows_with_any.clamp(min=1)
        if loss_agg_mode == "seq-mean-token-mean":
            # fastppo's seq-mean-token-mean divides the sum of row means by the rows with a token
            return "seq-mean-token-mean", rows_with_any.clamp(min=1) * dp_size / global_batch_size
        scale = dp_size / global_batch_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = scale / (loss_scale_factor if loss_scale_factor is not None else mask.shape[-1])
        return "sum", scale
    raise ValueError("loss_agg_mode must be one of token-mean, token-sum, seq-mean-token-sum, "
                     f"seq-mean-token-sum-norm, seq-mean-token-mean; got {loss_agg_mode!r}")


def _masked_mean(x, mask):
    return (torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)).item()


def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                config=None, rollout_is_weights=None):
    """The "fastppo" entry of verl's policy-loss registry (verl's PolicyLossFn signature)."""
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required: it holds the clip ratios")
    clip = config.clip_ratio
    low = clip if config.clip_ratio_low is None else config.clip_ratio_low
    high = clip if config.clip_ratio_high is None else config.clip_ratio_high
    dual = config.get("clip_ratio_c", 3.0)
    if not dual > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (the dual-clip bound); got {dual}")
    mask = response_mask.bool()
    # Each token's term is positively homogeneous in A (dual clip included): w * term(A) = term(w * A).
    weighted = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    reduction, scale = _reduction(loss_agg_mode, mask, **(getattr(config, "global_batch_info", None) or {}))
    out = reference.ppo_loss_from_logprobs(
        log_prob, torch.zeros_like(log_prob), old_log_prob, weighted, mask, clip_eps=low,
        clip_eps_high=high, dual_clip=dual, value_clip=None, reduction=reduction)
    loss = out.loss * scale

    with torch.no_grad():  # verl's metrics, on the unweighted advantages
        log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
        ratio = log_ratio.exp()
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
        metrics = {
            "actor/pg_clipfrac": _masked_mean((clipped > unclipped).float(), mask),
            "actor/ppo_kl": _masked_mean(-log_ratio, mask),
            "actor/pg_clipfrac_lower": _masked_mean(
                ((torch.maximum(unclipped, clipped) > -advantages * dual) & (advantages < 0)).float(), mask),
        }
    return loss, metrics


def patch(backend: str = "auto") -> None:
    """Route verl's log-prob and entropy functions to fastppo's kernels and register the "fastppo"
    policy loss (idempotent). backend: the kernels' backend, see `fastppo.kernels`."""
    if not _patcher.begin(backend):
        return
    import verl.trainer.ppo.core_algos as core_algos
    for name, new in (("logprobs_from_logits", logprobs_from_logits),
                      ("entropy_from_logits", entropy_from_logits),
                      ("entropy_from_logits_with_chunking", entropy_from_logits_with_chunking)):
        _patcher.replace("verl.utils.torch_functional", name, new)
    registry = core_algos.POLICY_LOSS_REGISTRY
    _registered.append({"registry": registry, "had": LOSS_NAME in registry,
                        "before": registry.get(LOSS_NAME)})
    registry[LOSS_NAME] = policy_loss


def unpatch() -> None:
    """Put verl's original functions back and remove the "fastppo" policy loss."""
    _patcher.restore()
    while _registered:
        entry = _registered.pop()
        if entry["had"]:
            entry["registry"][LOSS_NAME] = entry["before"]
        else:
            entry["registry"].pop(LOSS_NAME, None)


def is_patched() -> bool:
    return _patcher.active


patched = _patching.context(_patcher, patch, unpatch)
