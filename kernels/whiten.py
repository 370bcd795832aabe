"""Masked whitening: (x - mean) / sqrt(var + eps) over the valid entries of the whole tensor.

Two passes over x. The first writes, per block, (count, mean, M2 = sum of squared deviations from the
block mean), which a few PyTorch ops merge in float64 with Chan's formula
    mean = sum(n_i mean_i) / n,   M2 = sum(M2_i + n_i (mean_i - mean)^2),   var = M2 / (n - 1)
(stable where sum(x^2) - n mean^2 would cancel). The second writes the output.
Byte floor per entry: x and the mask byte read twice, one float32 written.
The backward is the reference's (a handful of elementwise ops and two reductions).
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


def _whiten_triton(x, mask, shift_mean, eps):
    x, mask = x.contiguous(), mask.contiguous().view(torch.uint8)
    n = x.numel()
    blocks = triton.cdiv(n, BLOCK)
    partial = torch.empty((3, blocks), dtype=torch.float32, device=x.device)
    _whiten_stats_kernel[(blocks,)](x, mask, partial[0], partial[1], partial[2], n, BLOCK=BLOCK)
    count, mean_i, m2_i = partial.double()
    total = count.sum()
    mean = (count * mean_i).sum() / total
    var = (m2_i + count * (mean_i - mean) ** 2).sum() / (total - 1)
    stats = torch.stack([mean, torch.rsqrt(var + eps)]).float()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _whiten_apply_kernel[(blocks,)](x, mask, out, stats, n, SHIFT_MEAN=shift_mean, BLOCK=BLOCK)
    return out


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  backend: str = "auto") -> torch.Tensor:
    """Whiten x over its valid entries: (x - mean) * rsqrt(var + eps), with the Bessel-corrected
    variance, plus the mean back when shift_mean=False. x: floating, any shape; mask: bool, same shape,
    at least 2 valid entries (checked: one device sync). float32 output, 0 at invalid entries,
    differentiable with respect to x."""
    check_tensor("x", x, FLOAT_DTYPES, "a floating-point")
    check_mask(mask, x.shape, "x")
    check_same_device(x=x, mask=mask)
    eps = check_real("eps", eps, low=0.0)
    if not isinstance(shift_mean, bool):
        raise TypeError(f"shift_mean must be a bool; got {type(shift_mean).__name__}")
    valid = int(mask.sum())
    if valid < 2:
        raise ValueError(f"mask must mark at least 2 valid entries to estimate a variance; got {valid}")
    ref = lambda t: reference.masked_whiten(t, mask, shift_mean=shift_mean, eps=eps).float()  # noqa: E731
    if resolve_backend(backend, x.device) == "torch":
        return ref(x)
    fast = functools.partial(_whiten_triton, mask=mask, shift_mean=shift_mean, eps=eps)
    return with_reference_backward(fast, ref, x)


def compile_variants():
    """Example launches for the ahead-of-time compile check (tests/ops/test_compile.py): both passes,
    with and without the mean shifted back, on float32 and bf16 meta tensors."""
    x = lambda dt: torch.empty((4, 3000), dtype=dt, device="meta")  # noqa: E731
    yield "fp32-shift=True", lambda: _whiten_triton(x(torch.float32), x(torch.bool), True, 1e-8)
    yield "bf16-shift=False", lambda: _whiten_triton(x(torch.bfloat16), x(torch.bool), False, 1e-8)
