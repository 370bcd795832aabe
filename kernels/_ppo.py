"""The front end the two PPO losses share, `ppo_loss` (from logits) and `linear_ppo_loss` (from
hidden states): their options (`PPOLossOptions`), the checks of their arguments (`ppo_arguments`,
`check_ppo_inputs`), the rows of the fused kernels' per-token buffer (`STATS`), and what turns that
buffer, or the reference's log-probs, into a `PPOLossOutput` (`summary`, `reference_with_truncation`).

Private to fastppo.kernels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastppo.kernels import reference
from fastppo.kernels._checks import (check_choice, check_mask, check_per_token, check_real,
                                     check_same_device, check_token_inputs)
from fastppo.kernels._triton import tl
from fastppo.kernels._truncation import Truncation, check_in_kept_set, check_truncation
from fastppo.kernels.kl import ESTIMATORS
from fastppo.kernels.reference import REDUCTIONS, PPOLossOutput, reduction_weights

# The rows of the per-token buffer the forward fills, in order: the one definition. The kernels
# (ppo_loss.py, which imports them) read the constexprs below (jitted code may read only constexpr
# globals), Python indexes with int(NAME), and the C++ terms (csrc/ppo_loss.cpp) are compiled with
# -DPPO_STAT_<NAME>=<row> from this tuple (fastppo.kernels._native).
STATS = ("LP", "ENTROPY", "PG", "VF", "CLIPPED", "VCLIPPED", "LOSS", "DLP", "DV", "MAX", "LOGSUM")
LP, ENTROPY, PG, VF, CLIPPED, VCLIPPED, LOSS, DLP, DV, MAX, LOGSUM = (
    tl.constexpr(STATS.index(name)) for name in
    ("LP", "ENTROPY", "PG", "VF", "CLIPPED", "VCLIPPED", "LOSS", "DLP", "DV", "MAX", "LOGSUM"))


@dataclass(frozen=True)
class PPOLossOptions:
    """The PPO losses' scalar options, validated once when built (a bad value raises here, naming the
    argument); frozen, so nothing on the way to a kernel can change them. See `ppo_loss`
    (linear_ppo_loss takes every one but inplace_backward)."""

    temperature: float = 1.0
    clip_eps: float | None = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    reduction: str = "token-mean"
    inplace_backward: bool = False
    tis_cap: float | None = None
    top_k: int = 0
    top_p: float = 1.0
    allow_outside_kept: bool = False

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        # In the order ppo_loss has always checked them (with two bad options, the same error).
        put("temperature", check_real("temperature", self.temperature, low=0.0, low_open=True))
        if self.clip_eps is not None:
            put("clip_eps", check_real("clip_eps", self.clip_eps, low=0.0, low_open=True, high=1.0,
                                       high_open=True))
        if self.clip_eps_high is not None:
            if self.clip_eps is None:
                raise ValueError("clip_eps_high needs clip_eps (clip_eps=None turns clipping off)")
            put("clip_eps_high", check_real("clip_eps_high", self.clip_eps_high, low=0.0,
                                            low_open=True))
        if self.dual_clip is not None:
            put("dual_clip", check_real("dual_clip", self.dual_clip, low=1.0, low_open=True))
        if self.value_clip is not None:
            put("value_clip", check_real("value_clip", self.value_clip, low=0.0, low_open=True))
        check_choice("kl_estimator", self.kl_estimator, ESTIMATORS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        if not isinstance(self.inplace_backward, bool):
            raise TypeError(f"inplace_backward must be a bool; got "
                            f"{type(self.inplace_backward).__name__}")
        put("vf_coef", check_real("vf_coef", self.vf_coef, low=0.0))
        put("entropy_coef", check_real("entropy_coef", self.entropy_coef))
        put("kl_coef", check_real("kl_coef", self.kl_coef, low=0.0))
        if self.tis_cap is not None:
            put("tis_cap", check_real("tis_cap", self.tis_cap, low=0.0, low_open=True))
        trunc = check_truncation(self.top_k, self.top_p)
        put("top_k", trunc.top_k)
        put("top_p", trunc.top_p)
        if not isinstance(self.allow_outside_kept, bool):
            raise TypeError(f"allow_outside_kept must be a bool; got "
                            f"{type(self.allow_outside_kept).__name__}")

    @property
    def trunc(self) -> Truncation | None:
        """The top-k / top-p truncation, or None for the plain distribution."""
        return Truncation(self.top_k, self.top_p) if self.top_k or self.top_p < 1.0 else None

    @property
    def clip_low(self) -> float:
        """The ratio's lower clip bound, 1 - clip_eps (unused without clipping)."""
        return 1.0 - (self.clip_eps or 0.0)

    @property
    def clip_high(self) -> float:
        """The ratio's upper clip bound, 1 + (clip_eps_high or clip_eps)."""
        return 1.0 + (self.clip_eps_high if self.clip_eps_high is not None else self.clip_eps or 0.0)

    @property
    def kl_estimator_id(self) -> int:
        """The kernels' KL_ESTIMATOR: 0 without a KL term, else 1, 2, 3 for k1, k2, k3."""
        return ESTIMATORS.index(self.kl_estimator) + 1 if self.kl_coef else 0

    def reference_terms(self) -> dict:
        """The keyword arguments of reference.ppo_loss_from_logprobs these options set."""
        return dict(clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
                    dual_clip=self.dual_clip, value_clip=self.value_clip, vf_coef=self.vf_coef,
                    entropy_coef=self.entropy_coef, kl_coef=self.kl_coef,
                    kl_estimator=self.kl_estimator, reduction=self.reduction,
                    tis_cap=self.tis_cap)


# The per-token tensors of both losses, by their argument names.
TENSORS = ("old_logprobs", "advantages", "values", "old_values", "returns", "ref_logprobs",
           "sampler_logprobs")


def ppo_arguments(logits, arguments: dict) -> tuple[PPOLossOptions, dict, torch.Tensor]:
    """The argument handling both losses share. `arguments`: the public function's own arguments by
    name (its locals() on entry); those named like a field of PPOLossOptions build the options (a
    loss without `inplace_backward` keeps its default), the `TENSORS` and labels and mask are checked
    (`check_ppo_inputs`; `logits` may be a zero-size stand-in of the logits' shape, dtype and
    device). Returns the options, the per-token tensors by name, and the labels with -100 outside
    the mask."""
    opts = PPOLossOptions(**{field.name: arguments[field.name]
                             for field in dataclasses.fields(PPOLossOptions)
                             if field.name in arguments})
    tensors = {name: arguments[name] for name in TENSORS}
    labels = check_ppo_inputs(logits, arguments["labels"], arguments["mask"], opts, **tensors)
    return opts, tensors, labels


def reference_with_truncation(lp, entropy, mask, opts: PPOLossOptions, tensors) -> PPOLossOutput:
    """The reference's terms from (truncated) log-probs, with the kept-set check and outside_kept."""
    if opts.trunc is not None and not opts.allow_outside_kept:
        check_in_kept_set(lp, mask, "labels")
    out = reference.ppo_loss_from_logprobs(lp, entropy, mask=mask, **tensors,
                                           **opts.reference_terms(), truncated=opts.trunc is not None)
    if opts.trunc is None:
        return out
    outside = (mask & (lp == float("-inf"))).sum() / mask.sum().clamp(min=1)
    return dataclasses.replace(out, outside_kept=outside.float())


def check_ppo_inputs(logits, labels, mask, opts: PPOLossOptions, **tensors) -> torch.Tensor:
    """The PPO losses' checks of their tensors (`logits` may be a zero-size expanded stand-in of the
    logits' shape, dtype and device); returns the labels with -100 outside the mask."""
    check_token_inputs(logits, labels, opts.temperature, -100, validate=False)
    shape = labels.shape
    check_mask(mask, shape, "labels")
    check_per_token(shape, "labels", old_logprobs=tensors["old_logprobs"],
                    advantages=tensors["advantages"])
    given = {k: t for k, t in tensors.items() if t is not None}
    check_per_token(shape, "labels", **{k: t for k, t in given.items()
                                        if k not in ("old_logprobs", "advantages")})
    check_same_device(logits=logits, labels=labels, mask=mask, **given)
    values, returns, old_values = tensors["values"], tensors["returns"], tensors["old_values"]
    if values is None and (returns is not None or old_values is not None):
        raise ValueError("returns/old_values were given without values: pass the critic's values")
    if values is not None and returns is None:
        raise ValueError("values needs returns (the value targets)")
    if values is not None and opts.value_clip is not None and old_values is None:
        raise ValueError("value_clip needs old_values; pass value_clip=None for an unclipped value loss")
    if opts.kl_coef and tensors["ref_logprobs"] is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if (opts.tis_cap is None) != (tensors["sampler_logprobs"] is None):
        raise ValueError("tis_cap and sampler_logprobs go together: truncated importance sampling "
                         "weighs by min(exp(old_logprobs - sampler_logprobs), tis_cap)")
    # Every counted position needs a real label: one labelled ignore_index (-100) would be counted
    # with log-prob 0 and zero gradient, silently (one device sync).
    vocab = logits.shape[-1]
    outside = mask & ((labels < 0) | (labels >= vocab))
    if bool(outside.any()):
        raise ValueError(f"labels must lie in [0, {vocab}) wherever mask is True; found "
                         f"{labels[outside].flatten()[0].item()} ({int(outside.sum())} such labels)")
    return torch.where(mask, labels, -100)


def fused_inputs(mask, opts: PPOLossOptions, old_logprobs, advantages, sampler_logprobs):
    """The fused kernels' reduction weights, and the advantages with the truncated importance
    weights folded in: max(-wA r, -wA clip(r)) = w max(-A r, -A clip(r)) for w >= 0."""
    if opts.tis_cap is not None:
        w = torch.clamp(torch.exp(old_logprobs.float() - sampler_logprobs.float()), max=opts.tis_cap)
        advantages = torch.where(mask, advantages.float() * w, 0.0)
    return reduction_weights(mask, opts.reduction).float(), advantages


def summary(loss, stats, mask, weights, old_logprobs, values, opts: PPOLossOptions) -> PPOLossOutput:
    """PPOLossOutput from the fused kernels' loss and per-token buffer (len(STATS), N); with
    truncation, refuses labels outside the kept set unless opts.allow_outside_kept."""
    outside = None
    if opts.trunc is not None:
        lp = stats[int(LP)].view(mask.shape)
        if not opts.allow_outside_kept:
            check_in_kept_set(lp, mask, "labels")
        outside = (mask & (lp == float("-inf"))).reshape(-1)
    maskf = mask.reshape(-1).float()
    count = maskf.sum().clamp(min=1)
    token_mean = lambda t: (t * maskf).sum() / count  # noqa: E731
    weighted = lambda t: (weights.reshape(-1) * t).sum()  # noqa: E731
    old = old_logprobs.reshape(-1).float()
    log_ratio = torch.where(mask.reshape(-1), stats[int(LP)] - old, 0.0)
    if outside is not None:
        log_ratio = torch.where(outside, 0.0, log_ratio)  # 0 in approx_kl, as in the reference
    return PPOLossOutput(
        loss=loss,
        policy_loss=weighted(stats[int(PG)]),
        value_loss=None if values is None else weighted(stats[int(VF)]),
        entropy=token_mean(stats[int(ENTROPY)]),
        approx_kl=token_mean(0.5 * log_ratio ** 2),
        clipfrac=token_mean(stats[int(CLIPPED)]),
        value_clipfrac=None if values is None else token_mean(stats[int(VCLIPPED)]),
        outside_kept=None if outside is None else token_mean(outside.float()),
    )


def no_kl_outside_kept(stats, opts: PPOLossOptions) -> None:
    """The native terms (csrc/ppo_loss.cpp) know nothing of truncation: where lp = -inf (the label
    left the kept set) take the KL term out of the loss and d loss / d lp, as the Triton kernel and
    the reference do (the policy term's gradient is already 0 there: the ratio is clamped)."""
    outside = stats[int(LP)] == float("-inf")
    if bool(outside.any()):
        kept_terms = stats[int(PG)] - opts.entropy_coef * stats[int(ENTROPY)] + opts.vf_coef * stats[
            int(VF)]
        stats[int(LOSS)] = torch.where(outside, kept_terms, stats[int(LOSS)])
        stats[int(DLP)] = torch.where(outside, 0.0, stats[int(DLP)])
