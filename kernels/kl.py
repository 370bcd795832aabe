"""KL penalties and KL-shaped rewards.

    x = logprobs - ref_logprobs:   k1 = x,   k2 = x^2 / 2,   k3 = exp(-x) - 1 + x
    rewards_t = -kl_coef * k(x_t) on valid tokens, + score at each row's last valid token

Byte floor: kl_penalty reads 2 and writes 1 value per token; kl_rewards reads 2 values and a mask
byte per token and writes 1 float32. The backward of both is the reference's (elementwise).
"""
from __future__ import annotations

import functools

import torch

from fastppo.kernels import reference
from fastppo.kernels._checks import (check_choice, check_mask, check_per_token, check_real,
                                     check_rows_have_valid, check_same_device, check_time_dim,
                                     resolve_backend)
from fastppo.kernels._refgrad import with_reference_backward
from fastppo.kernels._triton import tl, triton

ESTIMATORS = ("k1", "k2", "k3")
BLOCK = 1024


@triton.jit
def kl_term(x, ESTIMATOR: tl.constexpr):
    """k1, k2 or k3 of x = logprob - ref_logprob (ESTIMATOR = 1, 2, 3). Shared with ppo_loss."""
    if ESTIMATOR == 1:
        return x
    elif ESTIMATOR == 2:
        return 0.5 * x * x
    else:
        return tl.exp(-x) - 1.0 + x


@triton.jit
def kl_term_grad(x, ESTIMATOR: tl.constexpr):
    """d kl_term / dx. Shared with ppo_loss."""
    if ESTIMATOR == 1:
        return x * 0.0 + 1.0
    elif ESTIMATOR == 2:
        return x
    else:
        return 1.0 - tl.exp(-x)


@triton.jit
def _kl_penalty_kernel(lp_ptr, ref_ptr, out_ptr, n, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32) \
        - tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, kl_term(x, ESTIMATOR), mask=inb)


@triton.jit
def _kl_rewards_kernel(
    # pointers
    lp_ptr, ref_ptr, scores_ptr, mask_ptr, out_ptr,
    # shapes
    T,
    # meta
    kl_coef, ESTIMATOR: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    last = -1
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        inb = offs < T
        valid = tl.load(mask_ptr + base + offs, mask=inb, other=0) != 0
        x = tl.load(lp_ptr + base + offs, mask=valid, other=0.0).to(tl.float32) \
            - tl.load(ref_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + offs, tl.where(valid, -kl_coef * kl_term(x, ESTIMATOR), 0.0),
                 mask=inb)
        last = tl.maximum(last, tl.max(tl.where(valid, offs, -1), axis=0))
    # The score lands on the row's last valid token: recompute that token's reward from the inputs
    # rather than read back a value another thread of this program may not have stored yet.
    at = tl.maximum(last, 0)
    x = tl.load(lp_ptr + base + at).to(tl.float32) - tl.load(ref_ptr + base + at).to(tl.float32)
    reward = -kl_coef * kl_term(x, ESTIMATOR) + tl.load(scores_ptr + row).to(tl.float32)
    tl.store(out_ptr + base + at, reward, mask=last >= 0)


def _estimator_id(estimator: str) -> int:
    return ESTIMATORS.index(estimator) + 1


def _kl_penalty_triton(logprobs, ref_logprobs, estimator):
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
    if lp.numel():
        _kl_penalty_kernel[(triton.cdiv(lp.numel(), BLOCK),)](
            lp, ref, out, lp.numel(), ESTIMATOR=_estimator_id(estimator), BLOCK=BLOCK)
    return out


def _kl_rewards_triton(logprobs, ref_logprobs, scores, mask, kl_coef, estimator):
    T = mask.shape[-1]
    out = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    rows = mask.numel() // T if T else 0
    if rows:
        _kl_rewards_kernel[(rows,)](
            logprobs.contiguous(), ref_logprobs.contiguous(), scores.contiguous(),
            mask.contiguous().view(torch.uint8), out, T, kl_coef,
            ESTIMATOR=_estimator_id(estimator), BLOCK_T=min(triton.next_power_of_2(T), 1024))
    return out


def _as_float32(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs).float()
    return wrapped


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1",
               backend: str = "auto") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference from log-probs of sampled tokens.

    With x = logprobs - ref_logprobs: "k1" -> x, "k2" -> x**2 / 2, "k3" -> exp(-x) - 1 + x.
    Any shape; float32 output; differentiable with respect to both inputs.
    """
    check_per_token(getattr(logprobs, "shape", None), "logprobs", logprobs=logprobs,
                    ref_logprobs=ref_logprobs)
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_choice("estimator", estimator, ESTIMATORS)
    ref = _as_float32(functools.partial(reference.kl_penalty, estimator=estimator))
    if resolve_backend(backend, logprobs.device) == "torch":
        return ref(logprobs, ref_logprobs)
    fast = functools.partial(_kl_penalty_triton, estimator=estimator)
    return with_reference_backward(fast, ref, logprobs, ref_logprobs)


def kl_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
               mask: torch.Tensor, *, kl_coef: float, estimator: str = "k1",
               backend: str = "auto") -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl_penalty(logprobs, ref_logprobs) on valid tokens, 0 elsewhere,
    with scores[b] added at row b's last valid token (the reward model's outcome reward).

    Args: logprobs, ref_logprobs (B, T) floating; scores (B,) floating; mask (B, T) bool, and every
    row needs a valid token (checked: one device sync). Returns float32 (B, T).
    """
    check_time_dim("logprobs", logprobs)
    check_per_token(logprobs.shape, "logprobs", logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_per_token(logprobs.shape[:-1], "logprobs.shape[:-1]", scores=scores)
    check_mask(mask, logprobs.shape, "logprobs")
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs, scores=scores, mask=mask)
    kl_coef = check_real("kl_coef", kl_coef)
    check_choice("estimator", estimator, ESTIMATORS)
    check_rows_have_valid(mask, "kl_rewards needs one to place the score on")
    ref = _as_float32(lambda lp, rlp, sc: reference.kl_rewards(lp, rlp, sc, mask, kl_coef=kl_coef,
                                                                estimator=estimator))
    if resolve_backend(backend, logprobs.device) == "torch":
        return ref(logprobs, ref_logprobs, scores)
    fast = lambda lp, rlp, sc: _kl_rewards_triton(lp, rlp, sc, mask, kl_coef, estimator)  # noqa: E731
    return with_reference_backward(fast, ref, logprobs, ref_logprobs, scores)


def compile_variants():
    """Example launches for the ahead-of-time compile check (tests/ops/test_compile.py): both kernels
    per estimator, kl_penalty on bf16 log-probs, kl_rewards on float32 ones, on meta tensors."""
    rows = lambda dt=torch.float32: torch.empty((4, 3000), dtype=dt, device="meta")  # noqa: E731
    for est in ESTIMATORS:
        yield est, lambda est=est: (
            _kl_penalty_triton(rows(torch.bfloat16), rows(), est),
            _kl_rewards_triton(rows(), rows(), rows()[:, 0], rows(torch.bool), 0.05, est))
