"""Group-relative advantages for critic-free PPO: one score per sample, samples in groups of k.

The k samples of one prompt sit next to each other (scores[g*k : (g+1)*k] is group g). With the
group's mean m and centred scores c_i = s_i - m:
    grpo      A_i = c_i / (std + eps),  std = sqrt(sum c^2 / (k - 1))   (Bessel, as TRL and verl)
    dr_grpo   A_i = c_i                                                 (Dr. GRPO: no division)
    rloo      A_i = s_i - mean of the k - 1 others = k / (k - 1) * c_i
A group of one sample, or of equal scores, gets A = 0 exactly (never NaN, even with eps = 0): the
scores are centred on the group's first one before its mean is taken, so equal scores give c = 0 in
any precision, and RLOO has no other sample to compare a group of one with.

Byte floor: each score read once, one float32 written per sample. One program per group holds the
group in registers (two reductions, then the write). The backward is the reference's.
"""
from __future__ import annotations

import functools

import torch

from fastppo.kernels import reference
from fastppo.kernels._checks import (FLOAT_DTYPES, check_choice, check_int, check_real,
                                     check_same_device, check_tensor, resolve_backend)
from fastppo.kernels._refgrad import with_reference_backward
from fastppo.kernels._triton import tl, triton

MODES = ("grpo", "dr_grpo", "rloo")


@triton.jit
def _group_advantages_kernel(scores_ptr, out_ptr, k, rloo_scale, eps, MODE: tl.constexpr,
                             BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * k
    offs = tl.arange(0, BLOCK)
    valid = offs < k
    s = tl.load(scores_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
    # centred around the first score first: a group of equal scores is then exactly 0 (a float32
    # mean of equal non-dyadic numbers is not the number, and c / (std + eps) would blow it up)
    d = tl.where(valid, s - tl.sum(tl.where(offs == 0, s, 0.0), axis=0), 0.0)
    c = tl.where(valid, d - tl.sum(d, axis=0) / k, 0.0)
    if MODE == 0:  # grpo
        denom = tl.sqrt(tl.sum(c * c, axis=0) / tl.maximum(k - 1, 1)) + eps
        a = tl.where(denom > 0, c / tl.where(denom > 0, denom, 1.0), 0.0)
    elif MODE == 1:  # dr_grpo
        a = c
    else:  # rloo
        a = c * rloo_scale
    tl.store(out_ptr + base + offs, a, mask=valid)


def _group_advantages_triton(scores, group_size, mode, eps):
    scores = scores.contiguous()
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    rloo_scale = group_size / (group_size - 1) if group_size > 1 else 0.0
    _group_advantages_kernel[(scores.numel() // group_size,)](
        scores, out, group_size, rloo_scale, eps, MODE=MODES.index(mode),
        BLOCK=triton.next_power_of_2(group_size))
    return out


def group_advantages(scores: torch.Tensor, group_size: int, *, mode: str = "grpo", eps: float = 1e-6,
                     backend: str = "auto") -> torch.Tensor:
    """Advantages of B = G * group_size samples from their scores, relative to their group.

    Args:
        scores: (B,) floating, the samples of one prompt consecutive (group g = rows
            g*group_size ... (g+1)*group_size - 1).
        group_size: k >= 1, dividing B.
        mode: "grpo" (centred, divided by the group's std + eps), "dr_grpo" (centred only) or
            "rloo" (minus the mean of the group's other samples); see the module docstring.
        eps: >= 0, added to the std (grpo).
        backend: "triton", "torch" (the reference) or "auto" (Triton on CUDA, else the reference);
            "native" runs the reference (no C++ kernel: B numbers are not worth one).

    Returns:
        float32 (B,) advantages, differentiable with respect to scores (the reference's gradient).
    """
    check_tensor("scores", scores, FLOAT_DTYPES, "a floating-point")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), one score per sample; got shape "
                         f"{tuple(scores.shape)}")
    group_size = check_int("group_size", group_size)
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"group_size must be >= 1 and divide the number of scores "
                         f"({scores.numel()}); got {group_size}")
    check_choice("mode", mode, MODES)
    eps = check_real("eps", eps, low=0.0)
    check_same_device(scores=scores)
    ref = lambda s: reference.group_advantages(s, group_size, mode=mode, eps=eps).float()  # noqa: E731
    if scores.numel() == 0 or resolve_backend(backend, scores.device) != "triton":
        return ref(scores)
    fast = functools.partial(_group_advantages_triton, group_size=group_size, mode=mode, eps=eps)
    return with_reference_backward(fast, ref, scores)


def compile_variants():
    """Example launches for the ahead-of-time compile check (tests/ops/test_compile.py): each mode,
    float32 and bf16 scores, on meta tensors."""
    for mode in MODES:
        for dtype in (torch.float32, torch.bfloat16):
            scores = torch.empty(48, dtype=dtype, device="meta")
            yield f"{mode}-{str(dtype)[6:]}", functools.partial(
                _group_advantages_triton, scores, 6, mode, 1e-6)
