"""fastppo's kernels inside OpenRLHF: log-probs and entropies from logits, and its PPO policy loss.

    import fastppo.integrations.openrlhf as fastppo_openrlhf
    fastppo_openrlhf.patch()    # before OpenRLHF builds its actors (they construct PolicyLoss once),
                                # in every process that trains: its Ray actors, not only the driver

What `patch()` replaces (tested with OpenRLHF 0.11.2; other versions get a warning, not a failure),
in every OpenRLHF module that bound the name:
- `openrlhf.models.utils.log_probs_from_logits(logits, labels, temperature=1.0)` ->
  `fastppo.kernels.token_logprobs` (output in the logits' dtype, as OpenRLHF's). OpenRLHF's Actor
  divides its float32 logits by the temperature itself and calls this with temperature 1; a caller
  that passes a temperature gets it applied once, as OpenRLHF does, but fastppo does not divide the
  caller's logits in place (OpenRLHF's version does: the caller's tensor changes under it).
- `compute_entropy(logits)` -> the kernel's entropy, in the logits' dtype.
- `PolicyLoss` -> a subclass whose forward computes the PPO loss (`policy_loss_type="ppo"`, no
  train/rollout importance-sampling correction: OpenRLHF's defaults) with fastppo's definition
  (`fastppo.kernels.reference.ppo_loss_from_logprobs`): ratio = exp(clamp(lp - old_lp, ±20)),
  `clip_eps_low`/`clip_eps_high`, the optional `dual_clip`, token-level or sequence-level
  aggregation with OpenRLHF's global `dp_size`/`batch_num_tokens`/`global_batch_size`, and OpenRLHF's
  outputs (loss, clip_ratio, ppo_kl of the unclamped log-ratio, None, None). GSPO and the
  importance-sampling corrections run OpenRLHF's own forward. One deliberate difference: a
  micro-batch without a valid token gives 0 where OpenRLHF's masked mean gives NaN (0 / 0).
  Actors built before `patch()` keep the loss object they made.
"""
from __future__ import annotations

import torch

from fastppo.integrations import _patching
from fastppo.integrations._patching import Patcher
from fastppo.kernels import reference

TESTED = ">=0.11,<0.12"
_patcher = Patcher("openrlhf", "openrlhf", TESTED, extra="openrlhf")


def log_probs_from_logits(logits, labels, temperature=1.0):
    """OpenRLHF's `log_probs_from_logits` on fastppo's kernel: log_softmax(logits / T)[labels]."""
    logprobs, _ = _patching.logprobs_entropy(logits, labels, temperature=float(temperature),
                                             backend=_patcher.backend)
    return logprobs.to(logits.dtype)


def compute_entropy(logits):
    """OpenRLHF's `compute_entropy` on fastppo's kernel: the entropy of softmax(logits)."""
    return _patching.entropy(logits, backend=_patcher.backend).to(logits.dtype)


def _reduction(token_level, mask, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's `aggregate_loss` as (fastppo reduction, scale)."""
    if token_level:
        return ("token-mean", 1.0) if batch_num_tokens is None else ("sum", dp_size / batch_num_tokens)
    if global_batch_size is None:
        return "seq-mean-token-mean", 1.0
    rows_with_any = (mask.sum(-1) > 0).sum().clamp(min=1)
    return "seq-mean-token-mean", rows_with_any * dp_size / global_batch_size


def policy_loss_class(original: type) -> type:
    """OpenRLHF's PolicyLoss with its PPO term from fastppo (see the module's docstring)."""

    class PolicyLoss(original):
        def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                    dp_size=1, batch_num_tokens=None, global_batch_size=None):
            if self.policy_loss_type != "ppo" or self.is_correction_level != "off":
                return super().forward(log_probs, old_log_probs, advantages, action_mask,
                                       rollout_log_probs, dp_size, batch_num_tokens, global_batch_size)
            mask = (torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None
                    else action_mask.bool())
            reduction, scale = _reduction(self.token_level_loss, mask, dp_size, batch_num_tokens,
                                          global_batch_size)
            out = reference.ppo_loss_from_logprobs(
                log_probs, torch.zeros_like(log_probs), old_log_probs, advantages, mask,
                clip_eps=self.clip_eps_low, clip_eps_high=self.clip_eps_high, dual_clip=self.dual_clip,
                value_clip=None, reduction=reduction)
            log_ratio = (log_probs - old_log_probs).detach()
            ppo_kl = torch.where(mask, -log_ratio, 0.0).sum() / mask.sum().clamp(min=1)
            return out.loss * scale, out.clipfrac, ppo_kl, None, None

    PolicyLoss.__qualname__ = PolicyLoss.__name__ = "PolicyLoss"
    PolicyLoss.__module__ = __name__
    return PolicyLoss


# What importing openrlhf.models pulls in that CPU machines lack (flash-attn needs CUDA to install)
# and that its log-prob, entropy and loss functions never use.
GPU_ONLY_IMPORTS = ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils",
                    "flash_attn.utils.distributed", "deepspeed", "deepspeed.ops", "deepspeed.ops.adam")


def import_without_gpu_only_modules() -> None:
    """Import openrlhf.models (+ .utils, .loss, .actor) with GPU_ONLY_IMPORTS replaced by stand-ins
    and torch.compile by the identity, during the import only, as OpenRLHF's own CPU tests do; for
    fastppo's tests and benchmarks on machines without CUDA. The stand-ins are removed afterwards."""
    import importlib.machinery
    import sys
    from unittest import mock

    added = [n for n in GPU_ONLY_IMPORTS if n not in sys.modules]
    for name in added:
        stand_in = mock.MagicMock(name=name)
        stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stand_in.__path__ = []
        sys.modules[name] = stand_in
    compile_ = torch.compile
    torch.compile = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
    try:
        for module in ("openrlhf.models", "openrlhf.models.actor", "openrlhf.models.loss",
                       "openrlhf.models.utils"):
            importlib.import_module(module)
    finally:
        torch.compile = compile_
        for name in added:
            del sys.modules[name]


def patch(backend: str = "auto") -> None:
    """Route OpenRLHF's log-prob/entropy functions and its PPO PolicyLoss to fastppo (idempotent).
    backend: the kernels' backend, see `fastppo.kernels`."""
    if not _patcher.begin(backend):
        return
    import openrlhf.models.loss as loss
    _patcher.replace("openrlhf.models.utils", "log_probs_from_logits", log_probs_from_logits)
    _patcher.replace("openrlhf.models.utils", "compute_entropy", compute_entropy)
    _patcher.replace("openrlhf.models.loss", "PolicyLoss", policy_loss_class(loss.PolicyLoss))


def unpatch() -> None:
    """Put OpenRLHF's originals back, everywhere they were replaced."""
    _patcher.restore()


def is_patched() -> bool:
    return _patcher.active


patched = _patching.context(_patcher, patch, unpatch)
