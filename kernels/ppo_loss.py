"""The PPO actor + critic loss, fused, directly from logits.

Per valid token, with lp = log softmax(x / T)[label], ratio = exp(clamp(lp - old_lp, -20, 20)):
    pg   = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))        (capped at -A * c if A < 0)
    vf   = 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -v, v) - R)^2)
    loss = pg + vf_coef * vf - entropy_coef * H + kl_coef * kl(lp - ref_lp)
reduced as sum(w * loss) with per-token weights w from the reduction (`reference.reduction_weights`).

One program per token. Forward: one pass over the token's logits (the shared online log-sum-exp, with
the entropy), then every per-token term, policy and value, in the same program; it also stores the
token's d loss / d lp and d loss / d V (scalars, times w). Backward: one more read of the logits and one
write of the gradient (the shared softmax-gradient loop, with g_lp = g * dlp and g_H = -g * w * c_H),
and the value gradient from the same launch.
Byte floor: forward N*V*b, backward 2*N*V*b (b bytes per logit), plus ~40 bytes per token.
Top-k / top-p: lp, H and their gradient are the truncated distribution's (as in token_logprobs: each
row's threshold first, fastppo.kernels._truncation, then the same passes with the logits below it
read as -inf).
"""
from __future__ import annotations

import torch

from fastppo.kernels import _native
from fastppo.kernels._checks import resolve_backend
from fastppo.kernels._layout import as_outer_inner
from fastppo.kernels._ppo import (CLIPPED, DLP, DV, ENTROPY, LOGSUM, LOSS, LP, MAX, PG, STATS, VCLIPPED,
                                  VF, PPOLossOptions, fused_inputs, no_kl_outside_kept, ppo_arguments,
                                  reference_with_truncation, summary)
from fastppo.kernels._rows import (gradient_buffer, launch_config, row_logsumexp,
                                   row_softmax_grad, truncate)
from fastppo.kernels._truncation import row_thresholds
from fastppo.kernels._triton import tl, triton
from fastppo.kernels.kl import kl_term, kl_term_grad
from fastppo.kernels.reference import PPOLossOutput
from fastppo.kernels.token_logprobs import token_logprobs


@triton.jit
def _ppo_loss_fwd_kernel(
    # pointers
    logits_ptr, labels_ptr, mask_ptr, weight_ptr, old_lp_ptr, adv_ptr, values_ptr, old_values_ptr,
    returns_ptr, ref_lp_ptr, out_ptr, threshold_ptr,
    # shapes
    n_inner, V, N,
    # strides (of the logits' two row dimensions)
    stride_outer, stride_inner,
    # meta
    temperature, clip_low, clip_high, dual_clip, value_clip, vf_coef, entropy_coef, kl_coef,
    HAS_CLIP: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_VALUES: tl.constexpr,
    HAS_VALUE_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr, TRUNCATED: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    active = tl.load(mask_ptr + row) != 0
    label = tl.load(labels_ptr + row).to(tl.int64)
    threshold = float("-inf")
    if TRUNCATED:
        threshold = tl.load(threshold_ptr + row)
    m, log_s, entropy = row_logsumexp(base, tl.where(active, V, 0), temperature, True, BLOCK_V,
                                      threshold, TRUNCATED)
    in_vocab = (label >= 0) & (label < V)
    x_label = tl.load(base + tl.where(active & in_vocab, label, 0)).to(tl.float32)
    x_label = truncate(x_label, threshold, TRUNCATED)  # outside the kept set: lp = -inf
    lp = tl.where(in_vocab, (x_label - m) / temperature - log_s, float("nan"))
    w = tl.load(weight_ptr + row)

    # Policy term. d pg / d lp = d pg / d ratio * ratio, where the clamps pass gradient inside their
    # closed range (as torch.clamp does) and the branch not taken by max / min passes none.
    old_lp = tl.load(old_lp_ptr + row).to(tl.float32)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    log_ratio = lp - old_lp
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
    ratio_grad = tl.where((log_ratio >= -20.0) & (log_ratio <= 20.0), ratio, 0.0)
    pg = -adv * ratio
    dpg = -adv * ratio_grad
    clip_frac = 0.0
    if HAS_CLIP:
        pg_clip = -adv * tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        clipped = pg_clip > pg  # only possible outside [clip_low, clip_high]: zero gradient there
        pg = tl.where(clipped, pg_clip, pg)
        dpg = tl.where(clipped, 0.0, dpg)
        clip_frac = tl.where(clipped, 1.0, 0.0)
    if HAS_DUAL_CLIP:
        capped = (adv < 0.0) & (-adv * dual_clip < pg)
        pg = tl.where(capped, -adv * dual_clip, pg)
        dpg = tl.where(capped, 0.0, dpg)
    loss = pg - entropy_coef * entropy
    dlp = dpg
    if KL_ESTIMATOR > 0:
        x = lp - tl.load(ref_lp_ptr + row).to(tl.float32)
        kl = kl_term(x, KL_ESTIMATOR)
        dkl = kl_term_grad(x, KL_ESTIMATOR)
        if TRUNCATED:  # lp = -inf (label outside the kept set): no KL term, no gradient (reference.py)
            kl = tl.where(lp == float("-inf"), 0.0, kl)
            dkl = tl.where(lp == float("-inf"), 0.0, dkl)
        loss += kl_coef * kl
        dlp += kl_coef * dkl

    # Value term, in the same program.
    vf = 0.0
    dv = 0.0
    vclip_frac = 0.0
    if HAS_VALUES:
        v = tl.load(values_ptr + row).to(tl.float32)
        ret = tl.load(returns_ptr + row).to(tl.float32)
        vf = (v - ret) * (v - ret)
        dv = v - ret
        if HAS_VALUE_CLIP:
            old_v = tl.load(old_values_ptr + row).to(tl.float32)
            # old_V + clip(V - old_V, -c, c), written as a clamp of V so that it is V exactly inside
            # the range: the float32 sum would round and mark in-range tokens as clipped.
            v_clip = tl.minimum(tl.maximum(v, old_v - value_clip), old_v + value_clip)
            vf_clip = (v_clip - ret) * (v_clip - ret)
            vclipped = vf_clip > vf  # only possible when V - old_V is clamped: zero gradient there
            vf = tl.where(vclipped, vf_clip, vf)
            dv = tl.where(vclipped, 0.0, dv)
            vclip_frac = tl.where(vclipped, 1.0, 0.0)
        vf = 0.5 * vf
        loss += vf_coef * vf
        dv = vf_coef * dv

    # Invalid tokens: all zeros (their weight is 0 as well).
    stats = out_ptr + row
    tl.store(stats + LP * N, tl.where(active, lp, 0.0))
    tl.store(stats + ENTROPY * N, tl.where(active, entropy, 0.0))
    tl.store(stats + PG * N, tl.where(active, pg, 0.0))
    tl.store(stats + VF * N, tl.where(active, vf, 0.0))
    tl.store(stats + CLIPPED * N, tl.where(active, clip_frac, 0.0))
    tl.store(stats + VCLIPPED * N, tl.where(active, vclip_frac, 0.0))
    tl.store(stats + LOSS * N, tl.where(active, loss, 0.0))
    tl.store(stats + DLP * N, tl.where(active, w * dlp, 0.0))
    tl.store(stats + DV * N, tl.where(active, w * dv, 0.0))
    tl.store(stats + MAX * N, tl.where(active, m, 0.0))
    tl.store(stats + LOGSUM * N, tl.where(active, log_s, 0.0))


@triton.jit
def _ppo_loss_bwd_kernel(
    # pointers
    logits_ptr, labels_ptr, mask_ptr, weight_ptr, stats_ptr, grad_out_ptr, grad_logits_ptr,
    grad_values_ptr, threshold_ptr,
    # shapes
    n_inner, V, N,
    # strides (logits; and the gradient's, which equal the logits' when written in place)
    stride_outer, stride_inner, grad_stride_outer, grad_stride_inner,
    # meta
    temperature, entropy_coef,
    HAS_ENTROPY: tl.constexpr, HAS_VALUES: tl.constexpr, TRUNCATED: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer, inner = row // n_inner, row % n_inner
    threshold = float("-inf")
    if TRUNCATED:
        threshold = tl.load(threshold_ptr + row)
    active = tl.load(mask_ptr + row) != 0
    label = tl.load(labels_ptr + row).to(tl.int64)
    g = tl.load(grad_out_ptr).to(tl.float32)  # the upstream gradient of the scalar loss
    stats = stats_ptr + row
    g_h = 0.0
    if HAS_ENTROPY:
        g_h = -g * entropy_coef * tl.load(weight_ptr + row)
    row_softmax_grad(logits_ptr + outer * stride_outer + inner * stride_inner,
                     grad_logits_ptr + outer * grad_stride_outer + inner * grad_stride_inner,
                     label, active, V, tl.load(stats + MAX * N), tl.load(stats + LOGSUM * N),
                     tl.load(stats + ENTROPY * N), g * tl.load(stats + DLP * N), g_h, temperature,
                     HAS_ENTROPY, BLOCK_V, threshold, TRUNCATED)
    if HAS_VALUES:
        dv = g * tl.load(stats + DV * N)
        tl.store(grad_values_ptr + row, dv.to(grad_values_ptr.dtype.element_ty))


def _forward(x3, labels, mask, weights, old_lp, adv, values, old_values, returns, ref_lp,
             opts: PPOLossOptions, tau=None) -> torch.Tensor:
    """The forward kernel over (outer, inner, V) logits and flat (N,) per-token inputs (mask as
    uint8; optional ones None; tau the rows' truncation thresholds or None). Returns the
    (len(STATS), N) float32 per-token buffer."""
    n, V = labels.numel(), x3.shape[-1]
    stats = torch.empty((len(STATS), n), dtype=torch.float32, device=x3.device)  # all rows written
    if n:
        block, warps = launch_config(V)
        dummy = stats  # pointer for the optional inputs a constexpr flag switches off
        f = lambda t: dummy if t is None else t  # noqa: E731
        _ppo_loss_fwd_kernel[(n,)](
            x3, labels, mask, weights, old_lp, adv, f(values), f(old_values), f(returns), f(ref_lp),
            stats, f(tau),
            x3.shape[1], V, n, x3.stride(0), x3.stride(1),
            opts.temperature, opts.clip_low, opts.clip_high, opts.dual_clip or 0.0,
            opts.value_clip or 0.0, opts.vf_coef, opts.entropy_coef, opts.kl_coef,
            HAS_CLIP=opts.clip_eps is not None, HAS_DUAL_CLIP=opts.dual_clip is not None,
            HAS_VALUES=values is not None,
            HAS_VALUE_CLIP=values is not None and opts.value_clip is not None,
            KL_ESTIMATOR=opts.kl_estimator_id, TRUNCATED=tau is not None, BLOCK_V=block,
            num_warps=warps,
        )
    return stats


def _backward(x3, labels, mask, weights, stats, grad_loss, g3, grad_values, opts: PPOLossOptions,
              tau=None):
    """The backward kernel: writes the logits' gradient into g3 ((outer, inner, V), may be x3
    itself) and the values' into grad_values (flat, or None without values)."""
    n, V = labels.numel(), x3.shape[-1]
    if n:
        block, warps = launch_config(V)
        _ppo_loss_bwd_kernel[(n,)](
            x3, labels, mask, weights, stats, grad_loss, g3,
            stats if grad_values is None else grad_values, stats if tau is None else tau,
            x3.shape[1], V, n, x3.stride(0), x3.stride(1), g3.stride(0), g3.stride(1),
            opts.temperature, opts.entropy_coef,
            HAS_ENTROPY=opts.entropy_coef != 0.0, HAS_VALUES=grad_values is not None,
            TRUNCATED=tau is not None, BLOCK_V=block, num_warps=warps,
        )


def _flat(t, dtype=None):
    """(N,) contiguous, in `dtype` if given; None stays None. A strided or expanded input is copied."""
    if t is None:
        return None
    t = t.reshape(-1)
    return (t if dtype is None else t.to(dtype)).contiguous()


def _finish_forward(ctx, logits, values, weights, stats, opts, *saved):
    """The loss sum(w * loss_t) from the per-token buffer, and what backward needs (saved tensors
    first, then weights and the buffer)."""
    loss = (weights.double() * stats[int(LOSS)].double()).sum().float()
    ctx.save_for_backward(*saved, weights, stats)
    ctx.opts, ctx.shape = opts, logits.shape
    ctx.logits = logits if opts.inplace_backward else None
    ctx.values_meta = None if values is None else (values.shape, values.dtype)
    ctx.mark_non_differentiable(stats)
    return loss, stats


class PPOLossFunction(torch.autograd.Function):
    """Triton forward and backward. Returns (loss, per-token stats (len(STATS), N) float32)."""

    @staticmethod
    def forward(ctx, logits, values, labels, mask, weights, old_lp, adv, old_values, returns, ref_lp,
                opts):
        x3 = as_outer_inner(logits)  # a view, or one copy if the rows need 3+ strides
        labels, mask, weights = _flat(labels), _flat(mask).view(torch.uint8), _flat(weights)
        tau = row_thresholds(x3, labels, -100, opts.temperature, opts.trunc, "triton")
        stats = _forward(x3, labels, mask, weights, _flat(old_lp), _flat(adv), _flat(values),
                         _flat(old_values), _flat(returns), _flat(ref_lp), opts, tau)
        return _finish_forward(ctx, logits, values, weights, stats, opts, x3, labels, mask, tau)

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        x3, labels, mask, tau, weights, stats = ctx.saved_tensors
        opts = ctx.opts
        g3, grad = gradient_buffer(x3, ctx.logits, ctx.shape, opts.inplace_backward)
        grad_values = None
        if ctx.values_meta is not None:
            grad_values = torch.empty(ctx.values_meta[0], dtype=ctx.values_meta[1], device=x3.device)
        _backward(x3, labels, mask, weights, stats, grad_loss.reshape(1).float(), g3, grad_values,
                  opts, tau)
        return (grad, grad_values) + (None,) * 9


class NativePPOLossFunction(torch.autograd.Function):
    """The C++ kernels on CPU: token_logprobs' vocabulary pass (csrc/token_logprobs.cpp), then the
    per-token PPO terms (csrc/ppo_loss.cpp); backward is token_logprobs' native softmax-gradient
    pass with the stored d loss / d lp. Same contract and per-token buffer as PPOLossFunction."""

    @staticmethod
    def forward(ctx, logits, values, labels, mask, weights, old_lp, adv, old_values, returns, ref_lp,
                opts):
        x3 = as_outer_inner(logits)  # a view, or one copy if the rows need 3+ strides
        module = _native.module()
        labels = _flat(labels, torch.long)
        f = lambda t: _flat(t, torch.float32)  # noqa: E731
        stats = torch.empty((len(STATS), labels.numel()), dtype=torch.float32)
        tau = row_thresholds(x3, labels, -100, opts.temperature, opts.trunc, "native")
        stats[int(LP)], stats[int(ENTROPY)], stats[int(MAX)], stats[int(LOGSUM)] = (
            module.token_logprobs_forward(x3, labels, opts.temperature, -100, True, tau))
        mask, weights = _flat(mask, torch.uint8), f(weights)
        module.ppo_loss_terms(
            stats, mask, weights, f(old_lp), f(adv), f(values), f(old_values), f(returns), f(ref_lp),
            opts.clip_eps is not None, opts.clip_low, opts.clip_high,
            opts.dual_clip is not None, opts.dual_clip or 0.0,
            values is not None and opts.value_clip is not None, opts.value_clip or 0.0,
            opts.vf_coef, opts.entropy_coef, opts.kl_coef, opts.kl_estimator_id)
        if tau is not None and opts.kl_coef:
            no_kl_outside_kept(stats, opts)
        return _finish_forward(ctx, logits, values, weights, stats, opts, x3, labels, tau)

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        x3, labels, tau, weights, stats = ctx.saved_tensors
        opts = ctx.opts
        g = grad_loss.float()
        grad3, grad = gradient_buffer(x3, ctx.logits, ctx.shape, opts.inplace_backward)
        has_entropy = opts.entropy_coef != 0.0
        g_h = -g * opts.entropy_coef * weights if has_entropy else weights
        _native.module().token_logprobs_backward(
            x3, labels, stats[int(MAX)], stats[int(LOGSUM)], stats[int(ENTROPY)],
            (g * stats[int(DLP)]).contiguous(), g_h.contiguous(), grad3, opts.temperature, -100,
            has_entropy, tau)
        grad_values = None
        if ctx.values_meta is not None:
            shape, dtype = ctx.values_meta
            grad_values = (g * stats[int(DV)]).to(dtype).view(shape)
        return (grad, grad_values) + (None,) * 9


def _storage_owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage a view shares (itself when it is not a view)."""
    while t._base is not None:
        t = t._base
    return t


def ppo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    entropy_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    sampler_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    allow_outside_kept: bool = False,
    reduction: str = "token-mean",
    inplace_backward: bool = False,
    backend: str = "auto",
) -> PPOLossOutput:
    """The PPO actor (+ critic) loss straight from logits, in one fused pass each way.

    Per valid token, with lp = log_softmax(logits / temperature)[label] and
    ratio = exp(clamp(lp - old_lp, -20, 20)):
        pg = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)))
             clip_eps=None: pg = -A * ratio;  dual_clip=c (> 1): pg capped at -A * c where A < 0
        vf = 0.5 * (V - R)^2, or with value_clip=v: 0.5 * max((V - R)^2, (Vc - R)^2),
             Vc = old_V + clip(V - old_V, -v, v)
        loss_t = pg + vf_coef * vf - entropy_coef * H + kl_coef * kl_penalty(lp, ref_lp, kl_estimator)
        tis_cap=C: pg is weighed by w = min(exp(old_lp - sampler_lp), C) (truncated importance
             sampling: the tokens were drawn by a sampler, e.g. vLLM, whose probabilities differ
             from the old policy's; w is a constant, no gradient flows through it)
    reduction: "token-mean" (over valid tokens), "seq-mean-token-mean" (mean over rows that have a
    valid token of each row's token mean) or "sum" (for callers normalising across micro-batches).
    top_k, top_p: lp and H (and their gradients) under the sampler's truncated distribution, as in
    `token_logprobs`. A valid token whose label lies outside the kept set has lp = -inf: refused
    (ValueError naming the positions: at the sampler's parameters it cannot have been sampled),
    unless allow_outside_kept=True, for later PPO steps where the policy has moved since sampling:
    such a token then counts with ratio 0 (clamped: no policy gradient), no KL term and 0 in
    approx_kl, and `outside_kept` reports their fraction.

    Args:
        logits: (..., V) float32/bfloat16/float16, strided like `token_logprobs` accepts.
        labels: (...) integer, in [0, V) wherever mask is True (checked: one device sync; a label of
            -100 there is refused too, not counted as log-prob 0).
        old_logprobs, advantages: (...) floating, from the rollout (no gradient flows into them).
        mask: (...) bool, the tokens that count.
        values: (...) floating, the critic's predictions (differentiable); needs `returns`, and
            `old_values` when value_clip is set.
        ref_logprobs: needed when kl_coef > 0.
        sampler_logprobs: (...) floating, the log-probs the rollout's sampler gave its tokens;
            needed by (and only by) tis_cap. Inside the fused kernels w multiplies the advantages
            (pg is positively homogeneous in A, dual clip included): no extra pass over the logits.
        inplace_backward: write the logits' gradient into the logits' own storage instead of a new
            buffer (saves an (N, V) allocation). After backward the logits tensor holds its
            gradient. Refused for a leaf tensor; any other autograd node that saved these logits
            raises autograd's usual "modified by an inplace operation" error rather than reading
            gradients. Honoured by the "triton" and "native" backends; "torch" allocates, and so
            does any backend for logits whose rows share memory (an expanded view).
        Every tensor argument may be any view (strided, transposed, sliced, expanded).

    Returns: PPOLossOutput (fastppo.kernels.reference) with the differentiable `loss` and detached
    stats.
    """
    opts, tensors, labels = ppo_arguments(logits, locals())  # locals(): the arguments, by name
    if inplace_backward and _storage_owner(logits).is_leaf and _storage_owner(logits).requires_grad:
        raise ValueError("inplace_backward=True would overwrite a leaf tensor's data (logits is that "
                         "leaf or a view of it) with its own gradient; pass logits produced by a "
                         "model, or inplace_backward=False")
    backend = resolve_backend(backend, logits.device, native_dtype=logits.dtype)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if backend == "torch":
        # token_logprobs' chunked reference, then the reference's per-token terms.
        lp, entropy = token_logprobs(logits, labels, temperature=opts.temperature,
                                     return_entropy=True, top_k=opts.top_k, top_p=opts.top_p,
                                     validate=False, backend="torch")
        return reference_with_truncation(lp, entropy, mask, opts, tensors)

    weights, advantages = fused_inputs(mask, opts, old_logprobs, advantages, sampler_logprobs)
    function = NativePPOLossFunction if backend == "native" else PPOLossFunction
    loss, stats = function.apply(logits, values, labels, mask, weights, old_logprobs, advantages,
                                 old_values, returns, ref_logprobs, opts)
    return summary(loss, stats, mask, weights, old_logprobs, values, opts)


def compile_variants():
    """Example launches for the ahead-of-time compile check (tests/ops/test_compile.py): forward and
    backward with every flag on (KL k1, k2, k3) or all off, per logits dtype; 64-bit row strides (all,
    or the outer one) with the gradient written in place, or 32-bit ones into a fresh buffer; on meta
    tensors: nothing is allocated or run."""
    on = dict(clip_eps=0.2, dual_clip=3.0, value_clip=0.2, entropy_coef=0.01, kl_coef=0.1)
    off = dict(clip_eps=None, value_clip=None)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp64": torch.float64, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}

    def launch(dt, labels_dt, flags, kl, strides, cut=(0, 1.0)):
        opts = PPOLossOptions(**(on if flags else off), kl_estimator=kl,
                              inplace_backward=strides != "i32", top_k=cut[0], top_p=cut[1])
        V = 151936  # (2, 3, V) logits; i64: strides past 2**31 elements
        strides = {"i32": (3 * V, V, 1), "i64": (2**34, 2**32, 1), "i64-outer": (2**34, V, 1)}[strides]
        logits = torch.empty_strided((2, 3, V), strides, dtype=dtypes[dt], device="meta")
        x3 = as_outer_inner(logits)
        tok = lambda dt="fp32": torch.empty(6, dtype=dtypes[dt], device="meta")  # noqa: E731
        labels, mask, weights = tok(labels_dt), tok("bool").view(torch.uint8), tok()
        values = tok("bf16") if flags else None
        tau = row_thresholds(x3, labels, -100, opts.temperature, opts.trunc, "triton")
        stats = _forward(x3, labels, mask, weights, tok(), tok(), values, values, values,
                         tok() if opts.kl_coef else None, opts, tau)
        g3, _ = gradient_buffer(x3, logits, logits.shape, opts.inplace_backward)
        _backward(x3, labels, mask, weights, stats, tok()[:1], g3,
                  None if values is None else torch.empty_like(values), opts, tau)

    for v in [("bf16", "i64", True, "k3", "i64"), ("bf16", "i64", False, "k3", "i64"),
              ("fp32", "i64", True, "k1", "i64"), ("fp16", "i32", True, "k2", "i64"),
              ("bf16", "i64", True, "k3", "i64-outer"), ("bf16", "i64", True, "k3", "i32"),
              ("fp64", "i64", True, "k3", "i32"), ("bf16", "i64", True, "k3", "i64", (50, 0.9))]:
        dt, labels_dt, flags, kl, strides = v[:5]
        cut = "" if len(v) < 6 else f"-top_k={v[5][0]}-top_p={v[5][1]}"
        yield (f"{dt}-labels={labels_dt}-flags={flags}-kl={kl if flags else 'off'}-strides={strides}"
               f"{cut}", lambda v=v: launch(*v))
