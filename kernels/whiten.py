"""Masked whitening: (x - mean) / sqrt(var + eps) over the valid entries of the whole tensor.

Two passes over x. The first writes, per block, (count, mean, M2 = sum of squared deviations from the
block mean), which a few PyTorch ops merge in float64 with Chan's formula
    mean = sum(n_i mean_i) / n,   M2 = sum(M2_i + n_i (mean_i - mean)^2),   var = M2 / (n - 1)
(stable where sum(x^2) - n mean^2 would cancel). The second writes the output.
Byte floor per entry: x and the mask byte read twice, one float32 written.
The backward is the reference's (a handful of elementwise ops and two reductions).

With a `process_group` (x split over ranks, e.g. data-parallel shards of one batch) the statistics are
those of every rank's valid entries: each rank merges its blocks into (count, mean, M2), the ranks
exchange those three numbers (one all_gather, never the tensor) and merge them the same way. The
gradient is the reference's, whose sums are all-reduced (torch.distributed.nn), so it is the gradient
of the sum of every rank's loss, as data-parallel training expects.
"""
from __future__ import annotations

import functools

import torch

from fastppo.kernels import reference
from fastppo.kernels._checks import (FLOAT_DTYPES, check_mask, check_real, check_same_device,
                                     check_tensor, resolve_backend)
from fastppo.kernels._refgrad import with_reference_backward
from fastppo.kernels._triton import tl, triton

BLOCK = 1024


@triton.jit
def _whiten_stats_kernel(x_ptr, mask_ptr, count_ptr, mean_ptr, m2_ptr, n, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(mask_ptr + offs, mask=offs < n, other=0) != 0
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    count = tl.sum(valid.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
    m2 = tl.sum(tl.where(valid, (x - mean) * (x - mean), 0.0), axis=0)
    tl.store(count_ptr + block, count)
    tl.store(mean_ptr + block, mean)
    tl.store(m2_ptr + block, m2)


@triton.jit
def _whiten_apply_kernel(x_ptr, mask_ptr, out_ptr, stats_ptr, n, SHIFT_MEAN: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(mask_ptr + offs, mask=offs < n, other=0) != 0
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr)
    rstd = tl.load(stats_ptr + 1)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=offs < n)


def _merge(count, mean_i, m2_i):
    """Chan's merge of groups' (count, mean, M2) into the whole's, in float64."""
    total = count.sum()
    mean = (count * mean_i).sum() / total
    return total, mean, (m2_i + count * (mean_i - mean) ** 2).sum()


def _whiten_triton(x, mask, shift_mean, eps, process_group=None):
    x, mask = x.contiguous(), mask.contiguous().view(torch.uint8)
    n = x.numel()
    blocks = triton.cdiv(n, BLOCK)
    partial = torch.empty((3, blocks), dtype=torch.float32, device=x.device)
    _whiten_stats_kernel[(blocks,)](x, mask, partial[0], partial[1], partial[2], n, BLOCK=BLOCK)
    total, mean, m2 = _merge(*partial.double())
    if process_group is not None:  # every rank's (count, mean, M2), merged again
        import torch.distributed as dist

        mine = torch.stack([total, torch.nan_to_num(mean), m2])  # an empty rank's mean is 0/0
        ranks = mine.new_empty(3 * dist.get_world_size(process_group))
        dist.all_gather_into_tensor(ranks, mine, group=process_group)
        total, mean, m2 = _merge(*ranks.view(-1, 3).T)
    stats = torch.stack([mean, torch.rsqrt(m2 / (total - 1) + eps)]).float()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _whiten_apply_kernel[(blocks,)](x, mask, out, stats, n, SHIFT_MEAN=shift_mean, BLOCK=BLOCK)
    return out


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  backend: str = "auto", process_group=None) -> torch.Tensor:
    """Whiten x over its valid entries: (x - mean) * rsqrt(var + eps), with the Bessel-corrected
    variance, plus the mean back when shift_mean=False. x: floating, any shape; mask: bool, same shape,
    at least 2 valid entries (checked: one device sync). float32 output, 0 at invalid entries,
    differentiable with respect to x.

    process_group: a torch.distributed process group over which x is split (each rank passes its
    part, of any shape); mean and variance are then those of all ranks' valid entries, as if the parts
    were one tensor, and the gradient is that of the sum of the ranks' losses. None: this x alone."""
    check_tensor("x", x, FLOAT_DTYPES, "a floating-point")
    check_mask(mask, x.shape, "x")
    check_same_device(x=x, mask=mask)
    eps = check_real("eps", eps, low=0.0)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean must be a bool; got {type(shift_mean).__name__}")
    valid = _valid_count(mask, process_group)
    if valid < 2:
        where = " over all ranks" if process_group is not None else ""
        raise ValueError(f"mask must mark at least 2 valid entries{where} to estimate a variance; "
                         f"got {valid}")
    ref = lambda t: reference.masked_whiten(  # noqa: E731
        t, mask, shift_mean=shift_mean, eps=eps, process_group=process_group).float()
    if resolve_backend(backend, x.device) == "torch":
        return ref(x)
    fast = functools.partial(_whiten_triton, mask=mask, shift_mean=shift_mean, eps=eps,
                             process_group=process_group)
    return with_reference_backward(fast, ref, x)


def _valid_count(mask: torch.Tensor, process_group) -> int:
    """The valid entries of mask (of every rank's mask, with a process group: one all-reduce)."""
    count = mask.sum()
    if process_group is not None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("process_group is given but torch.distributed is not initialized")
        dist.all_reduce(count, group=process_group)
    return int(count)


def compile_variants():
    """Example launches for the ahead-of-time compile check (tests/ops/test_compile.py): both passes,
    with and without the mean shifted back, on float32 and bf16 meta tensors."""
    x = lambda dt: torch.empty((4, 3000), dtype=dt, device="meta")  # noqa: E731
    yield "fp32-shift=True", lambda: _whiten_triton(x(torch.float32), x(torch.bool), True, 1e-8)
    yield "bf16-shift=False", lambda: _whiten_triton(x(torch.bfloat16), x(torch.bool), False, 1e-8)
