"""Top-k / top-p truncation for the vocabulary-reading ops (token_logprobs, ppo_loss and their linear
forms): the per-row threshold that turns the sampler's kept set into one comparison, and the check
that the counted labels lie in that set (`check_in_kept_set`).

The kept set (`reference.truncation_mask`, the one definition, shared with the sampler) is always
{v : x_v >= tau} for one value tau per row: top-k keeps x >= the k-th largest; top-p keeps the tokens
whose strictly-more-likely kept mass is below p, and that mass only grows as x falls. So every
backend first finds tau per row (a selection pass, no full sort), then runs the plain op's passes with
the logits below tau read as -inf: forward over the kept logits only, backward with the kept set held
fixed (it is piecewise constant in the logits). tau is one of the row's own values (as float32, in
logit units, before the temperature), or -inf where nothing is cut.

The kernels order the raw logits x, the sampler (and the reference) z = x / T in float32. Dividing
can round two adjacent x to one z: the sampler then keeps both as a tie where a cut between them keeps
only the larger here. Rare (T != 1, a cut falling exactly there); the engine counts such a sample as
outside the kept set (fastppo.ppo, `outside_kept_rollout`).

Private to fastppo.kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch

from fastppo.kernels import reference
from fastppo.kernels._triton import tl, triton


@dataclass(frozen=True)
class Truncation:
    """top_k = 0 and top_p = 1.0: no truncation (the plain op, bit for bit)."""

    top_k: int = 0
    top_p: float = 1.0

    @property
    def active(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def cuts(self, vocab: int) -> bool:
        """Whether anything can be cut from a row of `vocab` logits (k >= V keeps every token)."""
        return (0 < self.top_k < vocab) or self.top_p < 1.0


def check_truncation(top_k, top_p) -> Truncation:
    """Truncation(top_k, top_p), or a TypeError / ValueError naming the argument."""
    if isinstance(top_k, bool) or not isinstance(top_k, Integral):
        raise TypeError(f"top_k must be an int (0: no top-k); got {type(top_k).__name__} {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k); got {top_k}")
    if isinstance(top_p, bool) or not isinstance(top_p, Real):
        raise TypeError(f"top_p must be a real number in (0, 1] (1: no top-p); got "
                        f"{type(top_p).__name__}")
    top_p = float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (1: no top-p); got {top_p}")
    return Truncation(int(top_k), top_p)


def reference_thresholds(x3: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                         temperature: float, trunc: Truncation) -> torch.Tensor:
    """tau per row from the reference's kept set (float64): the smallest kept logit; -inf where nothing
    is cut or the row is ignored. For tests and the "torch" backend's checks."""
    x = x3.reshape(-1, x3.shape[-1]).float()
    keep = reference.truncation_mask(x.double() / temperature, trunc.top_k, trunc.top_p)
    tau = torch.where(keep, x, float("inf")).amin(-1)
    tau = torch.where(keep.all(-1), float("-inf"), tau)
    return torch.where(labels.reshape(-1) == ignore_index, float("-inf"), tau)


def thresholds(x3: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float,
               trunc: Truncation, backend: str) -> torch.Tensor:
    """(N,) float32 tau per row of the (outer, inner, V) logits x3 ("native" or "triton")."""
    n = labels.numel()
    if n == 0 or not trunc.cuts(x3.shape[-1]):
        return torch.full((n,), float("-inf"), dtype=torch.float32, device=x3.device)
    if backend == "native":
        from fastppo.kernels import _native

        return _native.module().truncation_thresholds(x3, labels.long(), ignore_index, temperature,
                                                      trunc.top_k, trunc.top_p)
    return triton_thresholds(x3, labels, ignore_index, temperature, trunc.top_k, trunc.top_p)


def row_thresholds(x3, labels, ignore_index, temperature, trunc: Truncation | None, backend):
    """The rows' truncation thresholds (N,), or None for the plain distribution (trunc None, or
    nothing it could cut from rows of this length)."""
    if trunc is None or not trunc.cuts(x3.shape[-1]):
        return None
    return thresholds(x3, labels, ignore_index, temperature, trunc, backend)


def check_in_kept_set(logprobs: torch.Tensor, counted: torch.Tensor, name: str) -> None:
    """Refuse counted positions whose truncated log-prob is -inf (one device sync): the label has
    probability zero under the top-k / top-p distribution, so it cannot have been sampled from it."""
    outside = counted & (logprobs == float("-inf"))
    if bool(outside.any()):
        where = [tuple(p) if len(p) > 1 else p[0] for p in outside.nonzero()[:5].tolist()]
        raise ValueError(
            f"{name} at positions {where}{' ...' if int(outside.sum()) > 5 else ''} "
            f"({int(outside.sum())} in all) lie outside the top_k/top_p kept set: probability 0 "
            "under the truncated distribution, so they cannot have been sampled with these settings "
            "(check that top_k, top_p and temperature are the sampler's)")


# ------------------------------------------------------------------------------ Triton threshold search
# (below: _thresholds_kernel and triton_thresholds)

# The search evaluates 16 candidate prefixes against a block of logits at once, as a [16, BLOCK] tile:
# blocks of at most this many logits keep that tile in registers.
THRESHOLD_BLOCK_V = 1024


@triton.jit
def _order_key(x, valid):
    """float32 -> an integer key in [0, 2**32) (int64) with the floats' order: the sign-magnitude
    bits become two's-complement order by flipping the magnitude bits of negatives, then are shifted
    up by 2**31. -0.0 sorts just below +0.0; invalid (past n_read) columns get -1, below every
    candidate, so they are never counted."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(valid, bits.to(tl.int64) + 2147483648, -1)


@triton.jit
def _key_to_float(t):
    """The inverse of _order_key: the float32 whose key is t. A key at or below -inf's (8388607:
    -inf itself or a negative NaN, which includes the search's "nothing found" 0) gives -inf."""
    bits = t - 2147483648
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    value = bits.to(tl.int32).to(tl.float32, bitcast=True)
    return tl.where(t <= 8388607, float("-inf"), value)


@triton.jit
def _thresholds_kernel(
    # pointers
    logits_ptr, labels_ptr, tau_ptr,
    # shapes
    n_inner, V,
    # strides (of the logits' two row dimensions; the vocabulary dimension is contiguous)
    stride_outer, stride_inner,
    # meta
    temperature, ignore_index, top_k, top_p,
    TOP_K: tl.constexpr, TOP_P: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """tau for one row: the kept set of truncation_mask(x / T, top_k, top_p) is {x >= tau}.

    A radix select instead of a sort: each logit maps to an order-preserving 32-bit key
    (_order_key), and the threshold key is built most-significant bits first, 4 bits per pass: the
    16 candidates prefix + d * 2**shift (d = 0..15) are tested together against each block (a
    [16, BLOCK_V] tile) and the largest passing d is appended. Whatever is tested is monotone in the
    candidate (a count or a mass of the keys >= it), so after 8 passes the prefix is the largest
    passing key, which is always one of the row's own keys: tau is one of its logits, exactly.
      top-k  the largest key t with count(key >= t) >= k: the k-th largest logit (ties included).
      top-p  masses e = exp((x - m) / T) of the top-k-kept logits (m: the row max, from one extra
             pass, so that no exp overflows); target = p * S. The largest key t with
             mass(key >= t) >= target is the smallest kept logit: a token is dropped exactly when
             the mass strictly above it already reaches p * S. S is candidate 0's mass in the first
             pass (key 0: the whole row), summed like every other candidate's, so a key's mass is
             the same number in every pass and the target is always within reach. A row with no
             mass (all -inf, or ignored) passes no candidate: top-p cuts nothing.
    tau is the larger of the two keys as a float32, or -inf where it cuts nothing (tau <= the row's
    smallest logit) or the label is ignore_index (such a row reads nothing: n_read = 0).

    Reads of the row: top-k only 8; top-p only 1 + 8; both 8 + 1 + 8 (the extra one: the max).
    A row holding NaN gets some tau but never faults.
    """
    # int64 before any multiply: row * stride exceeds 2**31 at real sizes (16k rows x 152k vocab).
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    n_read = tl.where(label != ignore_index, V, 0)  # ignored rows read nothing
    cols = tl.arange(0, BLOCK_V)
    digits = tl.arange(0, 16).to(tl.int64)
    row_min = float("inf")  # to tell "cuts nothing" (tau <= every logit) apart
    t_k = tl.full([], 0, tl.int64)
    t_p = tl.full([], 0, tl.int64)
    if TOP_K:
        for p in range(8):
            shift = 28 - 4 * p
            cand = t_k + (digits << shift)
            count = tl.zeros([16], dtype=tl.int32)
            for start in range(0, n_read, BLOCK_V):
                offs = start + cols
                valid = offs < n_read
                x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
                row_min = tl.minimum(row_min, tl.min(tl.where(valid, x, float("inf")), axis=0))
                key = _order_key(x, valid)
                count += tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), axis=1)
            t_k += tl.max(tl.where(count >= top_k, digits, 0), axis=0) << shift
    tau_k = _key_to_float(t_k)  # -inf without top-k
    if TOP_P:
        m = float("-inf")
        for start in range(0, n_read, BLOCK_V):
            offs = start + cols
            valid = offs < n_read
            x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
            m = tl.maximum(m, tl.max(x, axis=0))  # top-k keeps the max: also the kept set's max
            row_min = tl.minimum(row_min, tl.min(tl.where(valid, x, float("inf")), axis=0))
        m_ref = tl.where(m == float("-inf"), 0.0, m)  # an all -inf row: masses 0, not NaN
        target = -1.0  # set by the first pass, from its total
        for p in range(8):
            shift = 28 - 4 * p
            cand = t_p + (digits << shift)
            mass = tl.zeros([16], dtype=tl.float32)
            for start in range(0, n_read, BLOCK_V):
                offs = start + cols
                valid = offs < n_read
                x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32)
                key = _order_key(x, valid)
                e = tl.where(x >= tau_k, tl.exp((x - m_ref) / temperature), 0.0)
                mass += tl.sum(tl.where(key[None, :] >= cand[:, None], e[None, :], 0.0), axis=1)
            # first pass: candidate 0 is key 0, every key: its mass is the total S
            total = tl.sum(tl.where(digits == 0, mass, 0.0), axis=0)
            target = tl.where(target < 0.0, top_p * total, target)
            passing = (mass >= target) & (mass > 0.0)
            t_p += tl.max(tl.where(passing, digits, 0), axis=0) << shift
    tau = _key_to_float(tl.maximum(t_k, t_p))
    tl.store(tau_ptr + row, tl.where(tau <= row_min, float("-inf"), tau))


def triton_thresholds(x3: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                      temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(N,) float32 tau per row of the (outer, inner, V) logits x3 (N = outer * inner), by
    _thresholds_kernel: one program per row. -inf where nothing is cut or the label is ignored."""
    n_outer, n_inner, V = x3.shape
    n = n_outer * n_inner
    tau = torch.empty(n, dtype=torch.float32, device=x3.device)
    use_k, use_p = 0 < top_k < V, top_p < 1.0
    if n == 0 or not (use_k or use_p):
        return tau.fill_(float("-inf"))
    # The kernel reads labels[row] at labels_ptr + row: they must be one contiguous run.
    labels = labels.reshape(-1).contiguous()
    block = max(16, min(triton.next_power_of_2(V), THRESHOLD_BLOCK_V))
    _thresholds_kernel[(n,)](
        x3, labels, tau,
        n_inner, V, x3.stride(0), x3.stride(1),
        float(temperature), ignore_index, int(top_k), float(top_p),
        TOP_K=use_k, TOP_P=use_p, BLOCK_V=block, num_warps=4 if block <= 512 else 8,
    )
    return tau
