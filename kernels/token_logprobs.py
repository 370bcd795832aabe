"""Per-token log-probabilities and entropy, fused, directly from logits.

    logprob_t = log softmax(x_t / T)[y_t]        entropy_t = -sum_v p_tv log p_tv,  p_t = softmax(x_t / T)

Byte floor, for N rows of V logits of b bytes each (b = 2 for bf16/fp16, 4 for fp32):
    forward   reads N*V*b once                 (+ N labels in, 2 floats per row out, 2 saved)
    backward  reads N*V*b once, writes N*V*b   (+ a few floats per row)
so a benchmark reads forward time against N*V*b bytes and backward against 2*N*V*b.

Top-k / top-p (`top_k=`, `top_p=`): the same passes over the sampler's truncated distribution, each
row's logits below its threshold read as -inf (fastppo.kernels._truncation finds the threshold first:
a selection pass on "native", a bounded radix search on "triton"; that pass's reads come on top of
the byte floor above).

Precision: everything is accumulated in float32 from whatever the logits' dtype is. Instead of the
log-sum-exp itself the forward saves its two parts, the row max `m` (in logit units) and
`log s = log sum exp((x - m) / T)`, so that `log p = (x - m) / T - log s` is formed from a difference
of nearby numbers: at logits of magnitude 1e4 a saved `lse` would already carry an absolute error of
~1e-3 in float32, which every recomputed probability would inherit.
"""
from __future__ import annotations

import functools

import torch

from fastppo.kernels import _chunked, _native, reference
from fastppo.kernels._checks import check_token_inputs, resolve_backend
from fastppo.kernels._layout import as_outer_inner
from fastppo.kernels._rows import (gradient_buffer, launch_config, row_logsumexp,
                                   row_softmax_grad, truncate)
from fastppo.kernels._truncation import (Truncation, check_in_kept_set, check_truncation,
                                         row_thresholds, thresholds)
from fastppo.kernels._triton import tl, triton


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers
    logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, max_ptr, logsum_ptr, threshold_ptr,
    # shapes
    n_inner, V,
    # strides (of the logits' two row dimensions; the vocabulary dimension is contiguous)
    stride_outer, stride_inner,
    # meta
    temperature, ignore_index,
    RETURN_ENTROPY: tl.constexpr, TRUNCATED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # int64 before any multiply: row * stride exceeds 2**31 at real sizes (16k rows x 152k vocab).
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    threshold = float("-inf")
    if TRUNCATED:
        threshold = tl.load(threshold_ptr + row)
    # Ignored rows read nothing: the loop runs over n_read = 0 logits.
    m, log_s, entropy = row_logsumexp(base, tl.where(active, V, 0), temperature, RETURN_ENTROPY,
                                      BLOCK_V, threshold, TRUNCATED)
    in_vocab = (label >= 0) & (label < V)
    x_label = tl.load(base + tl.where(in_vocab & active, label, 0)).to(tl.float32)
    x_label = truncate(x_label, threshold, TRUNCATED)  # a label outside the kept set: -inf
    # A label outside [0, V) (possible only with validate=False) gives NaN, never an out-of-bounds read.
    logprob = tl.where(in_vocab, (x_label - m) / temperature - log_s, float("nan"))
    tl.store(logprobs_ptr + row, tl.where(active, logprob, 0.0))
    tl.store(max_ptr + row, tl.where(active, m, 0.0))
    tl.store(logsum_ptr + row, tl.where(active, log_s, 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers
    logits_ptr, labels_ptr, max_ptr, logsum_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
    grad_logits_ptr, threshold_ptr,
    # shapes
    n_inner, V,
    # strides (grad_logits is a fresh contiguous (N, V) buffer)
    stride_outer, stride_inner,
    # meta
    temperature, ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr, TRUNCATED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    h = 0.0
    g_h = 0.0
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
        h = tl.load(entropy_ptr + row)
    threshold = float("-inf")
    if TRUNCATED:
        threshold = tl.load(threshold_ptr + row)
    row_softmax_grad(base, grad_logits_ptr + row * V, label, label != ignore_index, V,
                     tl.load(max_ptr + row), tl.load(logsum_ptr + row), h,
                     tl.load(grad_logprobs_ptr + row), g_h, temperature, HAS_GRAD_ENTROPY, BLOCK_V,
                     threshold, TRUNCATED)


def _forward(x3: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
             return_entropy: bool, tau: torch.Tensor | None = None):
    """tau: (N,) thresholds of the truncated distribution, or None for the plain one."""
    n_outer, n_inner, V = x3.shape
    n = n_outer * n_inner
    logprobs, entropy, row_max, log_sum = (
        torch.empty(n, dtype=torch.float32, device=x3.device) for _ in range(4))
    if n:
        block, warps = launch_config(V)
        _token_logprobs_fwd_kernel[(n,)](
            x3, labels, logprobs, entropy, row_max, log_sum, logprobs if tau is None else tau,
            n_inner, V, x3.stride(0), x3.stride(1),
            temperature, ignore_index,
            RETURN_ENTROPY=return_entropy, TRUNCATED=tau is not None, BLOCK_V=block,
            num_warps=warps,
        )
    return logprobs, entropy, row_max, log_sum


def _backward(x3, labels, row_max, log_sum, entropy, grad_logprobs, grad_entropy, temperature,
              ignore_index, dtype, tau=None):
    n_outer, n_inner, V = x3.shape
    n = n_outer * n_inner
    grad = torch.empty((n, V), dtype=dtype, device=x3.device)
    if n:
        block, warps = launch_config(V)
        has_grad_entropy = grad_entropy is not None
        _token_logprobs_bwd_kernel[(n,)](
            x3, labels, row_max, log_sum, entropy, grad_logprobs,
            grad_entropy if has_grad_entropy else grad_logprobs, grad,
            row_max if tau is None else tau,
            n_inner, V, x3.stride(0), x3.stride(1),
            temperature, ignore_index,
            HAS_GRAD_ENTROPY=has_grad_entropy, TRUNCATED=tau is not None, BLOCK_V=block,
            num_warps=warps,
        )
    return grad


class TokenLogprobsFunction(torch.autograd.Function):
    """Triton forward and backward; outputs (logprobs, entropy) flattened to (N,) float32.
    trunc: the top-k / top-p truncation, or None."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, trunc=None):
        x3 = as_outer_inner(logits)  # a view, or one copy if the rows need 3+ strides
        # The kernel reads labels[row] at labels_ptr + row: they must be one contiguous run.
        # (reshape keeps a uniformly strided view such as index[..., j] as it is.)
        labels = labels.reshape(-1).contiguous()
        tau = row_thresholds(x3, labels, ignore_index, temperature, trunc, "triton")
        logprobs, entropy, row_max, log_sum = _forward(x3, labels, temperature, ignore_index,
                                                       return_entropy, tau)
        ctx.save_for_backward(x3, labels, row_max, log_sum, entropy, tau)
        ctx.temperature, ctx.ignore_index, ctx.shape = temperature, ignore_index, logits.shape
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        x3, labels, row_max, log_sum, entropy, tau = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(row_max)
        flat = lambda g: g.reshape(-1).to(torch.float32).contiguous()  # noqa: E731
        grad = _backward(x3, labels, row_max, log_sum, entropy, flat(grad_logprobs),
                         None if grad_entropy is None else flat(grad_entropy),
                         ctx.temperature, ctx.ignore_index, x3.dtype, tau)
        return grad.view(ctx.shape), None, None, None, None, None


class NativeTokenLogprobsFunction(torch.autograd.Function):
    """The C++ kernels of csrc/token_logprobs.cpp (CPU); same contract as TokenLogprobsFunction.
    With inplace=True the gradient is written into the logits' storage (used by ppo_loss)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, inplace=False,
                trunc=None):
        x3 = as_outer_inner(logits)  # a view, or one copy if the rows need 3+ strides
        labels = labels.reshape(-1).long().contiguous()
        tau = row_thresholds(x3, labels, ignore_index, temperature, trunc, "native")
        logprobs, entropy, row_max, log_sum = _native.module().token_logprobs_forward(
            x3, labels, temperature, ignore_index, return_entropy, tau)
        ctx.save_for_backward(x3, labels, row_max, log_sum, entropy, tau)
        ctx.temperature, ctx.ignore_index, ctx.shape = temperature, ignore_index, logits.shape
        ctx.inplace, ctx.logits = inplace, logits if inplace else None
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        x3, labels, row_max, log_sum, entropy, tau = ctx.saved_tensors
        flat = lambda g: g.reshape(-1).to(torch.float32).contiguous()  # noqa: E731
        g_lp = torch.zeros_like(row_max) if grad_logprobs is None else flat(grad_logprobs)
        g_h = row_max if grad_entropy is None else flat(grad_entropy)
        grad3, grad = gradient_buffer(x3, ctx.logits, ctx.shape, ctx.inplace)
        _native.module().token_logprobs_backward(x3, labels, row_max, log_sum, entropy, g_lp, g_h,
                                                 grad3, ctx.temperature, ctx.ignore_index,
                                                 grad_entropy is not None, tau)
        return grad, None, None, None, None, None, None


def _reference_rows(logits, labels, *, temperature, ignore_index, return_entropy, top_k=0,
                    top_p=1.0):
    # As in the kernel, a label outside [0, V) (validate=False) gives NaN instead of an indexing error.
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= logits.shape[-1]))
    out = reference.token_logprobs(logits, labels.masked_fill(outside, 0), temperature=temperature,
                                   ignore_index=ignore_index, return_entropy=return_entropy,
                                   top_k=top_k, top_p=top_p)
    out = out if return_entropy else (out,)
    return (out[0].float().masked_fill(outside, float("nan")),) + tuple(o.float() for o in out[1:])


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under softmax(logits / temperature), and optionally the entropy;
    with top_k / top_p, under the truncated distribution the sampler draws from.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 is accepted too). Any strides with a
            contiguous last dimension are read in place: `logits[:, :-1]` costs no copy. A last
            dimension that is not contiguous is copied once.
        labels: (...) int64 or int32, equal to logits.shape[:-1].
        temperature: > 0; logits are divided by it, identically in forward and backward.
        ignore_index: positions with this label get logprob 0, entropy 0 and zero gradient.
        return_entropy: also return the entropy of softmax(logits / temperature).
        top_k, top_p: score under the sampler's truncated distribution (`reference.truncation_mask`,
            the definition fastppo's sampler uses): temperature first, then top-k (every logit >= the
            k-th largest; 0: off), then top-p (drop a token once the renormalised mass of the kept
            tokens strictly more likely than it reaches p; 1.0: off), renormalised over the kept
            tokens. The entropy is that distribution's. A label outside the kept set has probability
            0: log-prob -inf. Backward holds the kept set fixed: (onehot - p_kept) / T on kept logits,
            0 on the others. Defaults: today's op, bit for bit.
        validate: check that every label is in [0, V) or equals ignore_index (one device sync), and
            with top_k / top_p that no label lies outside the kept set (a second sync; the error
            names the positions). With validate=False that is the caller's promise; a broken one
            yields NaN (or -inf outside the kept set) at that position, never an out-of-bounds read.
        backend: "triton", "native" (C++ CPU kernels), "torch" (the chunked
            reference) or "auto"; see `fastppo.kernels`.

    Returns:
        float32 logprobs of shape labels.shape, and with return_entropy the float32 entropy too.
        Both are differentiable with respect to logits; the gradient has the logits' dtype.
    """
    temperature = check_token_inputs(logits, labels, temperature, ignore_index, validate)
    trunc = check_truncation(top_k, top_p)
    backend = resolve_backend(backend, logits.device, native_dtype=logits.dtype)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if backend == "torch":
        fn = functools.partial(_reference_rows, temperature=temperature, ignore_index=ignore_index,
                               return_entropy=bool(return_entropy), top_k=trunc.top_k,
                               top_p=trunc.top_p)
        logprobs, *entropy = _chunked.rowwise(fn, logits, labels)
    else:
        trunc_arg = trunc if trunc.active else None
        if backend == "native":
            logprobs, entropy = NativeTokenLogprobsFunction.apply(
                logits, labels, temperature, ignore_index, bool(return_entropy), False, trunc_arg)
        else:
            logprobs, entropy = TokenLogprobsFunction.apply(
                logits, labels, temperature, ignore_index, bool(return_entropy), trunc_arg)
        logprobs, entropy = logprobs.view(labels.shape), [entropy.view(labels.shape)]
    if validate and trunc.active:
        check_in_kept_set(logprobs, labels != ignore_index, "labels")
    return (logprobs, entropy[0]) if return_entropy else logprobs


def compile_variants():
    """Example launches for the ahead-of-time compile check (tests/ops/test_compile.py): forward and
    backward per logits dtype, with and without entropy, with 32-bit row strides, 64-bit ones (int32
    labels with those) or a 64-bit outer one, and truncated (top-k, top-p, both: the threshold
    search, then forward and backward); on meta tensors: nothing is allocated or run."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp64": torch.float64, "i32": torch.int32, "i64": torch.int64}

    def launch(dt, labels_dt, entropy, strides, cut=None):
        V = 151936  # (2, 3, V) logits; i64: strides past 2**31 elements
        strides = {"i32": (3 * V, V, 1), "i64": (2**34, 2**32, 1), "i64-outer": (2**34, V, 1)}[strides]
        x3 = as_outer_inner(torch.empty_strided((2, 3, V), strides, dtype=dtypes[dt], device="meta"))
        labels = torch.empty(6, dtype=dtypes[labels_dt], device="meta")
        tau = None if cut is None else thresholds(x3, labels, -100, 0.7, Truncation(*cut), "triton")
        logprobs, h, row_max, log_sum = _forward(x3, labels, 0.7, -100, entropy, tau)
        _backward(x3, labels, row_max, log_sum, h, torch.empty_like(logprobs),
                  torch.empty_like(h) if entropy else None, 0.7, -100, dtypes[dt], tau)

    grid = [(dt, "i32" if wide else "i64", entropy, "i64" if wide else "i32")
            for dt in ("bf16", "fp16", "fp32") for entropy in (False, True) for wide in (False, True)]
    for v in grid + [("fp64", "i64", True, "i32"), ("bf16", "i64", True, "i64-outer")]:
        yield f"{v[0]}-labels={v[1]}-entropy={v[2]}-strides={v[3]}", functools.partial(launch, *v)
    for v in [("bf16", "i64", True, "i32", (50, 0.9)), ("fp32", "i32", True, "i64", (50, 1.0)),
              ("fp16", "i64", False, "i64-outer", (0, 0.9))]:
        yield (f"{v[0]}-labels={v[1]}-entropy={v[2]}-strides={v[3]}-top_k={v[4][0]}-top_p="
               f"{v[4][1]}", functools.partial(launch, *v))
