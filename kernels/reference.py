"""Plain-PyTorch references of every fused op in `fastppo.kernels`: `fastppo.kernels.reference`.

Each function reads like the math it computes and is correct in float64. Tests compare the kernels
against these, benchmarks use them as the baseline, and the `"torch"` backend evaluates them in chunks
(`fastppo.kernels._chunked`) where no faster kernel exists. Half-precision inputs are computed in float32;
float64 inputs stay float64 so the references can serve as ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (ground truth); every other floating dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def truncation_mask(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The tokens a top-k / top-p sampler may draw from scores z (..., V) (logits / temperature): the
    one definition, shared by the sampler (fastppo.rollout.hf.filter_logits) and every kernel.

    top-k (k > 0): keep every z >= the k-th largest z (ties at the k-th value are all kept).
    top-p (p < 1): then drop a kept token when the mass of the kept tokens strictly more likely than
    it, under softmax renormalised over the kept tokens, already reaches p. The most likely tokens
    are always kept; tied tokens are kept or dropped together.
    The kept set is always {z >= threshold} for one threshold per row (plus any NaN logit, which
    the row's outputs then carry, as without truncation)."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        keep = z >= kth
    if top_p < 1.0:
        q = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
        z_sorted, order = torch.sort(z.masked_fill(~keep, float("-inf")), dim=-1, descending=True)
        q_sorted = q.gather(-1, order)
        before = q_sorted.cumsum(-1) - q_sorted  # mass of the tokens sorted ahead of each
        # a tied token's strictly-more-likely mass is the one before the first token of its tie group
        first_of_ties = torch.searchsorted(-z_sorted, -z_sorted, right=False)
        more_likely = before.gather(-1, first_of_ties.clamp(max=z.shape[-1] - 1))
        drop_sorted = more_likely >= top_p
        keep = keep & ~torch.zeros_like(keep).scatter(-1, order, drop_sorted)
    return keep | torch.isnan(z)  # NaN in, NaN out: a NaN logit is never silently cut


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logprob_t = log softmax(logits_t / T)[label_t];  entropy_t = -sum_v p_tv log p_tv.

    With top_k / top_p, p_t is the truncated distribution the sampler draws from: softmax over the
    kept tokens (`truncation_mask`), zero elsewhere. A label outside the kept set gets -inf; the
    gradient treats the kept set as fixed (it is piecewise constant in the logits): zero on dropped
    logits. Positions whose label is `ignore_index` give 0 for both, with zero gradient.
    """
    z = logits.to(compute_dtype(logits)) / temperature
    if top_k or top_p < 1.0:
        with torch.no_grad():
            keep = truncation_mask(z, top_k, top_p)
        z = z.masked_fill(~keep, float("-inf"))
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


# ------------------------------------------------------------------------------- rollout: rewards


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1"):
    """Per-token KL estimate from x = logprobs - ref_logprobs (samples drawn from the policy):
    k1 = x,  k2 = x^2 / 2,  k3 = exp(-x) - 1 + x."""
    x = logprobs.to(compute_dtype(logprobs)) - ref_logprobs.to(compute_dtype(logprobs))
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x**2
    if estimator == "k3":
        return torch.exp(-x) - 1 + x
    raise ValueError(f"estimator must be one of ('k1', 'k2', 'k3'); got {estimator!r}")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True (rows are the last dimension); -1 for a row with none."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, positions, -1).amax(-1)


def kl_rewards(logprobs, ref_logprobs, scores, mask, *, kl_coef: float, estimator: str = "k1"):
    """r_t = -kl_coef * KL_t on response tokens, plus the sequence's score at its last response token."""
    # Padding may hold anything (NaN, -inf): zero it before the math so its gradient is 0, not NaN.
    kl = kl_penalty(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0),
                    estimator=estimator)
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    last = last_valid_index(mask)
    at_last = torch.arange(mask.shape[-1], device=mask.device) == last.unsqueeze(-1)
    return rewards + torch.where(at_last, scores.to(rewards.dtype).unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------- rollout: advantages


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 1.0):
    """Generalized advantage estimation over each row's valid positions, right to left:
        delta_k = r_k + gamma * V_next - V_k,   A_k = delta_k + gamma * lam * A_next,   R_k = A_k + V_k
    where "next" is the row's next *valid* position (V_next = A_next = 0 after the last one)."""
    dtype = compute_dtype(rewards)
    rewards, values = rewards.to(dtype), values.to(dtype)
    next_value = torch.zeros(rewards.shape[:-1], dtype=dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    advantages = []
    for t in reversed(range(rewards.shape[-1])):
        valid = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        adv = delta + gamma * lam * next_adv
        advantages.append(torch.where(valid, adv, 0.0))
        next_value = torch.where(valid, values[..., t], next_value)  # holes are skipped, not zeros
        next_adv = torch.where(valid, adv, next_adv)
    # T = 0: an empty tensor, still linked to the inputs so that backward works.
    advantages = torch.stack(advantages[::-1], dim=-1) if advantages else rewards - values
    return advantages, torch.where(mask, advantages + values, 0.0)


def reward_to_go(rewards, mask, *, gamma: float = 1.0):
    """R_k = r_k + gamma * R_next over each row's valid positions (the seed's reverse cumulative sum)."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return returns


def group_advantages(scores, group_size: int, *, mode: str = "grpo", eps: float = 1e-6):
    """Per group of `group_size` consecutive samples (k samples of one prompt), c = s - group mean:
        grpo     c / (std + eps), std = sqrt(sum c^2 / (k - 1))   (0 for a group of one)
        dr_grpo  c
        rloo     s - mean of the group's other samples = k / (k - 1) * c   (0 for a group of one)"""
    k = group_size
    s = scores.to(compute_dtype(scores)).reshape(-1, k)
    d = s - s[:, :1]  # equal scores: exactly 0, whatever the precision of the mean below
    c = d - d.mean(-1, keepdim=True)
    if mode == "dr_grpo":
        out = c
    elif mode == "rloo":
        out = c * (k / (k - 1) if k > 1 else 0.0)
    elif mode == "grpo":
        var = (c * c).sum(-1, keepdim=True) / max(k - 1, 1)
        # sqrt's gradient at 0 is inf (x 0 = NaN): take the root only where the variance is positive;
        # a zero denominator (equal scores, eps = 0) gives 0, not 0 / 0
        std = torch.where(var > 0, torch.where(var > 0, var, 1.0).sqrt(), 0.0)
        denom = std + eps
        out = torch.where(denom > 0, c / torch.where(denom > 0, denom, 1.0), 0.0)
    else:
        raise ValueError(f"mode must be one of ('grpo', 'dr_grpo', 'rloo'); got {mode!r}")
    return out.reshape(scores.shape)


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8, process_group=None):
    """(x - mean) / sqrt(var + eps) over the valid entries (Bessel-corrected variance); the mean is
    added back when shift_mean=False. Invalid entries give 0. With a `process_group`, the valid
    entries are those of every rank's x (each sum below is summed over the ranks, differentiably)."""
    x = torch.where(mask, x.to(compute_dtype(x)), 0.0)  # padding may hold anything
    n = sum_over_ranks(mask.sum().to(x.dtype), process_group)
    mean = sum_over_ranks(torch.where(mask, x, 0.0).sum(), process_group) / n
    var = sum_over_ranks(torch.where(mask, (x - mean) ** 2, 0.0).sum(), process_group) / (n - 1)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(mask, white, 0.0)


def sum_over_ranks(total: torch.Tensor, process_group=None) -> torch.Tensor:
    """`total` summed over the ranks of `process_group` (its gradient is summed back the same way);
    `total` itself without one."""
    if process_group is None:
        return total
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(total, group=process_group)


# ------------------------------------------------------------------------------------ the PPO loss

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "sum")


@dataclass(frozen=True)
class PPOLossOutput:
    """`loss` is differentiable with respect to logits and values; the rest are detached float32.

    policy_loss and value_loss use the loss's reduction (so that loss = policy_loss
    + vf_coef * value_loss - entropy_coef * entropy term + kl_coef * KL term); entropy, approx_kl,
    clipfrac and value_clipfrac are token-means over the valid tokens. value_loss and value_clipfrac
    are None when no values were given. outside_kept (top_k / top_p only, else None): the fraction of
    valid tokens whose label lies outside the current truncated kept set (see ppo_loss).
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor | None
    entropy: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor | None
    outside_kept: torch.Tensor | None = None


def reduction_weights(mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """w such that the reduced loss is sum(w * per_token_loss); 0 on invalid tokens.

    token-mean: 1 / (valid tokens);  seq-mean-token-mean: 1 / (row's valid tokens * rows with any);
    sum: 1. A batch without valid tokens reduces to 0."""
    mask = mask.to(torch.float64)
    if reduction == "token-mean":
        return mask / mask.sum().clamp(min=1)
    if reduction == "seq-mean-token-mean":
        per_row = mask.sum(-1, keepdim=True)
        rows = (per_row > 0).sum().clamp(min=1)
        return mask / (per_row.clamp(min=1) * rows)
    if reduction == "sum":
        return mask
    raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def ppo_loss_from_logprobs(
    logprobs, entropy, old_logprobs, advantages, mask, *, values=None, old_values=None, returns=None,
    clip_eps=0.2, clip_eps_high=None, dual_clip=None, value_clip=0.2, vf_coef=0.1, entropy_coef=0.0,
    ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", reduction="token-mean",
    sampler_logprobs=None, tis_cap=None, truncated=False,
) -> PPOLossOutput:
    """The PPO actor + critic loss from per-token log-probs and entropies (see `ppo_loss`).
    truncated: the log-probs are a top-k/top-p distribution's, where lp = -inf marks a label outside
    the kept set: no KL term there and 0 in approx_kl (without it, the plain semantics)."""
    dtype = compute_dtype(logprobs)
    # Padding may hold anything (NaN old log-probs, inf returns): zero it before the math so that
    # neither the loss nor any gradient sees it.
    f = lambda t: None if t is None else torch.where(mask, t.to(dtype), 0.0)  # noqa: E731
    lp, old_lp, adv = f(logprobs), f(old_logprobs), f(advantages)
    weights = reduction_weights(mask, reduction).to(dtype)
    token_mean = lambda t: torch.where(mask, t, 0.0).sum() / mask.sum().clamp(min=1)  # noqa: E731
    reduce = lambda t: torch.where(mask, weights * t, 0.0).sum()  # noqa: E731

    ratio = torch.exp(torch.clamp(lp - old_lp, -20.0, 20.0))
    pg = -adv * ratio
    clipped = torch.zeros_like(mask)
    if clip_eps is not None:
        high = clip_eps if clip_eps_high is None else clip_eps_high
        pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
        clipped = pg_clipped > pg
        pg = torch.maximum(pg, pg_clipped)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if tis_cap is not None:
        # truncated importance sampling: the rollout's tokens came from the sampler, not from the
        # old policy; weigh each token's policy-gradient term by min(pi_old / pi_sampler, cap)
        pg = torch.clamp(torch.exp(old_lp - f(sampler_logprobs)), max=tis_cap) * pg
    per_token = pg - entropy_coef * f(entropy)

    vf = value_clipped = None
    if values is not None:
        v, ret = f(values), f(returns)
        vf = (v - ret) ** 2
        value_clipped = torch.zeros_like(mask)
        if value_clip is not None:
            old_v = f(old_values)
            # = old_v + clip(v - old_v, ±value_clip), but exactly v inside the range (no rounding)
            v_clip = torch.clamp(v, old_v - value_clip, old_v + value_clip)
            vf_clip = (v_clip - ret) ** 2
            value_clipped = vf_clip > vf
            vf = torch.maximum(vf, vf_clip)
        vf = 0.5 * vf
        per_token = per_token + vf_coef * vf
    # lp = -inf: the label left the top-k/top-p kept set (a truncated policy gives it probability 0):
    # ratio 0 above, no KL term and 0 in approx_kl (as a sample of this policy its weight is 0)
    outside = (lp == float("-inf")) if truncated else torch.zeros_like(mask)
    if kl_coef:
        lp_kl = torch.where(outside, f(ref_logprobs), lp)  # no NaN gradient through the -inf
        per_token = per_token + kl_coef * kl_penalty(lp_kl, f(ref_logprobs), estimator=kl_estimator)

    stat = lambda t: t.detach().float()  # noqa: E731
    return PPOLossOutput(
        loss=reduce(per_token).float(),
        policy_loss=stat(reduce(pg)),
        value_loss=None if vf is None else stat(reduce(vf)),
        entropy=stat(token_mean(f(entropy))),
        approx_kl=stat(token_mean(torch.where(outside, 0.0, 0.5 * (lp - old_lp) ** 2))),
        clipfrac=stat(token_mean(clipped.to(dtype))),
        value_clipfrac=None if value_clipped is None else stat(token_mean(value_clipped.to(dtype))),
    )


def ppo_loss(logits, labels, old_logprobs, advantages, mask, *, temperature=1.0, top_k=0, top_p=1.0,
             **options):
    """Per valid token, with lp = log softmax(logits / T)[label] (with top_k / top_p: of the truncated
    distribution, `token_logprobs`) and ratio = exp(clamp(lp - old_lp, ±20)):
        pg = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))   [capped at -A * c where A < 0]
             [times min(exp(old_lp - sampler_lp), tis_cap) with tis_cap]
        vf = 0.5 * max((V - R)^2, (old_V + clip(V - old_V, ±v) - R)^2)
        loss_t = pg + vf_coef * vf - entropy_coef * H + kl_coef * KL(lp, ref_lp)
    reduced over valid tokens by `reduction`."""
    labels = torch.where(mask, labels, -100)
    lp, entropy = token_logprobs(logits, labels, temperature=temperature, return_entropy=True,
                                 top_k=top_k, top_p=top_p)
    return ppo_loss_from_logprobs(lp, entropy, old_logprobs, advantages, mask,
                                  truncated=bool(top_k) or top_p < 1.0, **options)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, **options):
    """token_logprobs of the logits hidden @ weight.T + bias."""
    return token_logprobs(torch.nn.functional.linear(hidden, weight, bias), labels, **options)


def linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, bias=None,
                    **options):
    """ppo_loss of the logits hidden @ weight.T + bias."""
    return ppo_loss(torch.nn.functional.linear(hidden, weight, bias), labels, old_logprobs,
                    advantages, mask, **options)
