"""fastppo's kernels inside TRL: one call, and the TRL trainer you already run uses them.

    import fastppo.integrations.trl as fastppo_trl
    fastppo_trl.patch()             # or: with fastppo_trl.patched(): trainer.train()
    trainer = GRPOTrainer(...)      # unchanged TRL code

What `patch()` replaces (tested with TRL 1.16; other versions get a warning, not a failure):
- `trl.trainer.utils.selective_log_softmax`, `entropy_from_logits` and
  `selective_log_softmax_and_entropy` (log-probs / entropy from logits), in every TRL module that
  bound them: `fastppo.kernels.token_logprobs`, one pass over the logits for both outputs.
- The LM-head op behind TRL's fused forward (`add_fused_lm_head`, through which GRPO, RLOO, DPO,
  KTO and SFT compute per-token log-probs and entropies without logits): the call is routed to
  `fastppo.kernels.linear_token_logprobs`. TRL's own chunked op still runs what fastppo does not
  compute: soft-capped or scaled heads (Gemma 2, Granite...), the extra outputs `log_sum_sq_probs`,
  `mean_logits` and `is_top1`, and heads partitioned by DeepSpeed ZeRO-3.

TRL's semantics are kept, not fastppo's (../shared/PEERS.md): TRL passes the temperature to these
helpers and never divides the logits before calling them in 1.16, so the replacement divides once;
`row_mask` rows give 0 with zero gradient; log-probs and entropies from logits come back in the
dtype TRL returns for the same inputs: float32 where TRL's own Triton kernel would take them
(CUDA/XPU), else the logits' dtype (fastppo computes in float32 and rounds once: in bf16/fp16 that is
the correctly rounded value, where torch's half-precision log_softmax is not); the fused head's outputs are
float32 and its matmul runs in autocast's dtype, else in the hidden states' dtype, as TRL's does.
Float64 logits go through fastppo's float64 reference (`fastppo.kernels.reference`).
"""
from __future__ import annotations

import sys
import warnings

import torch

from fastppo.integrations import _patching
from fastppo.integrations._patching import Patcher
from fastppo.kernels import linear_token_logprobs

TESTED = ">=1.16,<1.17"
_FUSED_HEAD = "_ChunkedLogProbFunction"
_IGNORE = -100

_patcher = Patcher("trl", "trl", TESTED, extra="trl")
_originals: dict[str, object] = {}


def _check_temperature(temperature) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")  # TRL's own message and type


def _trl_dtype(logits, index=None, row_mask=None) -> torch.dtype:
    """The dtype unpatched TRL returns for these inputs: float32 where its Triton kernel takes them
    (CUDA/XPU), else the logits' dtype (its torch fallback)."""
    utils = sys.modules["trl.trainer.utils"]
    supports = getattr(utils, "_supports_trl_loss_kernel", None)
    triton = getattr(utils, "is_triton_available", None)
    if supports is not None and triton is not None and triton() and supports(logits, index, row_mask):
        return torch.float32
    return logits.dtype


def _logprobs_entropy(logits, index, temperature, row_mask, with_entropy):
    """log p(index) and (with_entropy) the entropy of softmax(logits / T), rows where row_mask == 0
    set to 0 with zero gradient."""
    labels = index.long()
    if row_mask is not None:
        labels = labels.masked_fill(row_mask == 0, _IGNORE)
    return _patching.logprobs_entropy(logits, labels, temperature=temperature, ignore_index=_IGNORE,
                                      with_entropy=with_entropy, backend=_patcher.backend)


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL's `selective_log_softmax` on fastppo's kernel: log_softmax(logits / T) gathered at `index`
    of shape (...) or (..., K), in the logits' dtype; rows where row_mask == 0 give 0."""
    _check_temperature(temperature)
    if index.ndim == logits.ndim - 1:
        logprobs, _ = _logprobs_entropy(logits, index, temperature, row_mask, False)
        return logprobs.to(_trl_dtype(logits, index, row_mask))
    # K indices per row (top-K distillation): one kernel pass gives log Z through the first index,
    # log p_k = (x_k - x_first) / T + log p_first; the gather's gradient and the kernel's add up to
    # (onehot_k - p) / T.
    first, _ = _logprobs_entropy(logits, index[..., 0], temperature, None, False)
    picked = logits.gather(-1, index.long()).to(first.dtype)
    logprobs = (picked - picked[..., :1]) / temperature + first.unsqueeze(-1)
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
    return logprobs.to(_trl_dtype(logits, index, row_mask))


def entropy_from_logits(logits, chunk_size=128):
    """TRL's `entropy_from_logits` on fastppo's kernel: the entropy of softmax(logits) over the last
    axis, in the logits' dtype. `chunk_size` is accepted and unused: the kernel streams the rows."""
    del chunk_size
    return _patching.entropy(logits, backend=_patcher.backend).to(_trl_dtype(logits))


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0,
                                      row_mask=None):
    """TRL's fused log-prob + entropy helper on fastppo's kernel (one pass for both outputs)."""
    _check_temperature(temperature)
    logprobs, entropy = _logprobs_entropy(logits, index, temperature, row_mask, True)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    dtype = _trl_dtype(logits, index, row_mask)
    return logprobs.to(dtype), entropy.to(dtype)


class FusedHead:
    """Stands in for TRL's `_ChunkedLogProbFunction` (same `apply` signature and outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits",
                                        "is_top1")):
        extra = set(outputs) - {"log_probs", "entropy"}
        if final_logit_softcapping is not None or logit_scale != 1.0 or extra or hasattr(weight, "ds_id"):
            return _originals[_FUSED_HEAD].apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                 final_logit_softcapping, logit_scale, outputs)
        device = hidden.device.type
        if not torch.is_autocast_enabled(device) and weight.dtype != hidden.dtype:
            # TRL projects in the hidden states' dtype when autocast is off.
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        if "entropy" not in outputs:  # the reference model's call: log-probs only
            return linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                         backend=_patcher.backend), None, None, None, None
        logprobs, entropy = linear_token_logprobs(hidden, weight, targets, bias=bias,
                                                  temperature=temperature, return_entropy=True,
                                                  backend=_patcher.backend)
        return logprobs, entropy, None, None, None


def patch(backend: str = "auto") -> None:
    """Route TRL's log-prob and entropy helpers to fastppo's kernels (idempotent).

    backend: the kernels' backend ("auto": Triton on CUDA, the native C++ kernels on CPU).
    Patch before or after building the trainer: TRL looks the functions up at call time.
    """
    if not _patcher.begin(backend):
        return
    import trl.trainer.utils as utils
    replacements = {"selective_log_softmax": selective_log_softmax,
                    "entropy_from_logits": entropy_from_logits,
                    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
                    _FUSED_HEAD: FusedHead}
    missing = [name for name in replacements if not hasattr(utils, name)]
    if missing:
        warnings.warn(f"fastppo.integrations.trl: this TRL has no {', '.join(missing)}; those stay TRL's",
                      RuntimeWarning, stacklevel=2)
    for name, new in replacements.items():
        if name not in missing:
            _originals[name] = getattr(utils, name)
            _patcher.replace("trl.trainer.utils", name, new)


def unpatch() -> None:
    """Put TRL's original functions back, everywhere they were replaced."""
    _patcher.restore()  # _originals stays: a FusedHead someone still holds can defer to TRL's op


def is_patched() -> bool:
    return _patcher.active


patched = _patching.context(_patcher, patch, unpatch)
