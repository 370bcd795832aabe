"""What the vocabulary-reading ops (token_logprobs, ppo_loss) stand on: the online log-sum-exp over a
row of logits, the softmax-gradient pass that recomputes it, their launch configuration and the
buffer a backward writes the logits' gradient into. Private to fastppo.kernels."""
from __future__ import annotations

import torch

from fastppo.kernels._triton import tl, triton

# One program reads a row in blocks of at most this many logits (power of two).
MAX_BLOCK_V = 4096


@triton.jit
def truncate(x, threshold, TRUNCATED: tl.constexpr):
    """With TRUNCATED, logits below the row's top-k/top-p threshold (fastppo.kernels._truncation)
    become -inf: they are out of the sampler's kept set. NaN stays NaN (NaN in, NaN out)."""
    if TRUNCATED:
        x = tl.where((x >= threshold) | (x != x), x, float("-inf"))
    return x


@triton.jit
def row_logsumexp(base, n_read, temperature, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
                  threshold, TRUNCATED: tl.constexpr):
    """One pass over a row's first n_read logits -> (m, log s, entropy) in float32.
    With TRUNCATED, over the logits >= threshold only (the truncated distribution's).

    Online log-sum-exp over blocks. With d = (x - m) / T relative to the running max m:
        s = sum exp(d),   t = sum exp(d) * d      (so entropy = log s - t / s)
    When the max moves from m to m', both are re-based: a = exp((m - m') / T),
        s' = a * s,   t' = a * (t + s * (m - m') / T).
    The running max starts at -inf; a -inf logit (a banned token) contributes exp(-inf) = 0, and the
    `where`s keep -inf - (-inf) and 0 * -inf from turning into NaN.
    """
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    t = 0.0
    for start in range(0, n_read, BLOCK_V):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < n_read, other=float("-inf")).to(tl.float32)
        x = truncate(x, threshold, TRUNCATED)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = tl.where(s > 0.0, (m - m_ref) / temperature, 0.0)
        alpha = tl.exp(shift)
        d = (x - m_ref) / temperature
        e = tl.exp(d)
        if ENTROPY:  # before s moves on: the re-base uses the old s
            t = alpha * (t + s * shift) + tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    return m, log_s, log_s - t / s


@triton.jit
def row_softmax_grad(base, grad_base, label, active, V, m, log_s, h, g_lp, g_h, temperature,
                     HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
                     threshold, TRUNCATED: tl.constexpr):
    """Write d(g_lp * logprob + g_h * entropy) / d x for one row, recomputing p from (m, log s):
        d logprob / d x_v = (1[v == label] - p_v) / T,    d entropy / d x_v = -p_v (log p_v + H) / T
    With TRUNCATED the kept set is held fixed: p_v = 0 and a zero gradient below the threshold, and
    the one-hot term only where the label is kept. Inactive rows read nothing and write zeros."""
    cols = tl.arange(0, BLOCK_V)
    n_read = tl.where(active, V, 0)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < n_read, other=float("-inf")).to(tl.float32)
        is_label = offs == label
        if TRUNCATED:
            is_label = is_label & ((x >= threshold) | (x != x))
        x = truncate(x, threshold, TRUNCATED)
        logp = (x - m) / temperature - log_s
        p = tl.exp(logp)
        g = tl.where(is_label, g_lp, 0.0) - g_lp * p
        if HAS_GRAD_ENTROPY:
            g -= g_h * tl.where(p > 0.0, p * (logp + h), 0.0)
        g = tl.where(active, g / temperature, 0.0)
        tl.store(grad_base + offs, g.to(grad_base.dtype.element_ty), mask=offs < V)


def launch_config(V: int) -> tuple[int, int]:
    block = max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))
    return block, (4 if block <= 1024 else 8)


def _rows_overlap(x3) -> bool:
    """Whether two elements of x3 may share memory: with its dims sorted by stride, some stride is
    smaller than the span of the dims below it (always so for a stride-0, expanded dim)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x3.stride(), x3.shape) if sz > 1):
        if stride < span:
            return True
        span = stride * (size - 1) + span
    return False


def gradient_buffer(x3, logits, shape, inplace):
    """Where a backward writes the logits' gradient: (that buffer as an (outer, inner, V) view, the
    gradient to return for `logits`). A fresh contiguous buffer, or with `inplace` the logits' own
    storage (see ppo_loss(inplace_backward=True)): each row is read before it is overwritten, and the
    version counter is bumped so that any other autograd node that saved these logits raises
    autograd's "modified by an inplace operation" error instead of reading gradients. Rows that share
    memory (an expanded view, stride 0) get the fresh buffer: one row's gradient would overwrite
    logits that another row has yet to read."""
    if inplace and not _rows_overlap(x3):
        grad = logits if x3.data_ptr() == logits.data_ptr() else x3.view(shape)
        torch.autograd.graph.increment_version(grad)
        return x3, grad
    grad = torch.empty(shape, dtype=x3.dtype, device=x3.device)
    return grad.view(x3.shape), grad


