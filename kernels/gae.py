"""GAE and reward-to-go as segmented reverse scans (no Python loop over time).

Over each row's valid positions, right to left ("next" = the next valid position; 0 after the last):
    delta_k = r_k + gamma * V_next - V_k,    A_k = delta_k + gamma * lam * A_next,    R_k = A_k + V_k
    reward_to_go:  G_k = r_k + gamma * G_next

Both recurrences are linear, y_k = a_k * y_{k+1} + b_k, and compose associatively:
(a1, b1) after (a2, b2) = (a1 * a2, a1 * b2 + b1). An invalid position is the identity (a = 1, b = 0),
which is how holes are skipped rather than read as zeros. V_next is itself such a scan, over the row
shifted by one: W_k = valid_{k+1} ? V_{k+1} : W_{k+1}. One program walks a row in blocks from the end,
carrying both scans' values into the block on its left, so the cost per token does not depend on T.

Byte floor per token: reads r, V (float) and the mask byte; writes A and R (float32).
On CPU, backend "native" runs the same recurrences as plain C++ loops, one thread per row.
Backward (with respect to rewards and values) runs the same scans on time-reversed inputs.
"""
from __future__ import annotations

import torch

from fastppo.kernels import _native, reference
from fastppo.kernels._checks import (check_mask, check_per_token, check_real, check_same_device,
                                     check_time_dim, resolve_backend)
from fastppo.kernels._triton import tl, triton

MAX_BLOCK_T = 1024


@triton.jit
def _compose(a_right, b_right, a_left, b_left):
    # Triton's reverse scan combines (accumulated from the right, element on the left).
    return a_right * a_left, a_left * b_right + b_left


@triton.jit
def _gae_kernel(
    # pointers
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, returns_ptr,
    # shapes
    T,
    # meta
    gamma, decay, HAS_VALUES: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    next_value = 0.0  # V at the first valid position right of the current block
    next_adv = 0.0    # A there (the scan's value, which invalid positions pass through)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_blocks):
        start = (n_blocks - 1 - i) * BLOCK_T
        offs = start + tl.arange(0, BLOCK_T)
        valid = tl.load(mask_ptr + base + offs, mask=offs < T, other=0) != 0
        r = tl.load(rewards_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        delta = r
        if HAS_VALUES:
            v = tl.load(values_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
            valid_1 = tl.load(mask_ptr + base + offs + 1, mask=offs + 1 < T, other=0) != 0
            v_1 = tl.load(values_ptr + base + offs + 1, mask=valid_1, other=0.0).to(tl.float32)
            a_w, b_w = tl.associative_scan((tl.where(valid_1, 0.0, 1.0), v_1), 0, _compose,
                                           reverse=True)
            v_next = a_w * next_value + b_w
            delta = r + gamma * v_next - v
            next_value = tl.sum(tl.where(offs == start, v_next, 0.0), axis=0)
        a, b = tl.associative_scan((tl.where(valid, decay, 1.0), tl.where(valid, delta, 0.0)), 0,
                                   _compose, reverse=True)
        adv = a * next_adv + b
        next_adv = tl.sum(tl.where(offs == start, adv, 0.0), axis=0)
        tl.store(adv_ptr + base + offs, tl.where(valid, adv, 0.0), mask=offs < T)
        if HAS_VALUES:
            tl.store(returns_ptr + base + offs, tl.where(valid, adv + v, 0.0), mask=offs < T)


def _scan(rewards, values, mask, gamma: float, decay: float):
    """The kernel: A_k = delta_k + decay * A_next with delta = r + gamma * V_next - V (or delta = r
    when values is None, which makes A the reward-to-go). Returns float32 (A, A + V)."""
    T = mask.shape[-1]
    adv = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    ret = torch.empty_like(adv) if values is not None else adv
    rows = mask.numel() // T if T else 0
    if rows:
        _gae_kernel[(rows,)](
            rewards.contiguous(), rewards if values is None else values.contiguous(),
            mask.contiguous().view(torch.uint8), adv, ret, T, gamma, decay,
            HAS_VALUES=values is not None, BLOCK_T=min(triton.next_power_of_2(T), MAX_BLOCK_T))
    return adv, ret


def _forward_scan(x, mask, decay):
    """y_k = x_k + decay * y_prev over valid positions, left to right: the reverse scan, mirrored."""
    flipped_mask = mask.flip(-1)
    y, _ = _scan(torch.where(mask, x, 0.0).flip(-1), None, flipped_mask, 1.0, decay)
    return y.flip(-1)


def _previous_valid(x, mask):
    """x at each position's previous valid position (0 if none): the mirrored "next valid value"."""
    flipped = x.flip(-1)
    _, prev = _scan(torch.zeros_like(flipped), flipped, mask.flip(-1), 1.0, 0.0)
    return prev.flip(-1)


class _GAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, values, mask, gamma, lam):
        ctx.save_for_backward(mask)
        ctx.gamma, ctx.lam, ctx.dtypes = gamma, lam, (rewards.dtype, values.dtype)
        ctx.set_materialize_grads(False)
        return _scan(rewards, values, mask, gamma, gamma * lam)

    @staticmethod
    def backward(ctx, grad_adv, grad_ret):
        # A = L(delta), delta_j = r_j + gamma * V_next(j) - V_j, R = A + V, so with u = g_A + g_R:
        #   g_delta_j = u_j + gamma * lam * g_delta_prev(j)      (a forward scan)
        #   g_r = g_delta,    g_V_j = -g_delta_j + gamma * g_delta_prev(j) + g_R_j
        (mask,) = ctx.saved_tensors
        zero = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        g_adv = zero if grad_adv is None else grad_adv.float()
        g_ret = zero if grad_ret is None else grad_ret.float()
        g_delta = _forward_scan(g_adv + g_ret, mask, ctx.gamma * ctx.lam)
        g_values = torch.where(mask, -g_delta + ctx.gamma * _previous_valid(g_delta, mask) + g_ret, 0.0)
        return g_delta.to(ctx.dtypes[0]), g_values.to(ctx.dtypes[1]), None, None, None


class _RewardToGo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, mask, gamma):
        ctx.save_for_backward(mask)
        ctx.gamma, ctx.dtype = gamma, rewards.dtype
        return _scan(rewards, None, mask, 1.0, gamma)[0]

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _forward_scan(grad.float(), mask, ctx.gamma).to(ctx.dtype), None, None


class _NativeGAE(torch.autograd.Function):
    """The C++ loops of csrc/gae.cpp (CPU): one thread per row, same math."""

    @staticmethod
    def forward(ctx, rewards, values, mask, gamma, lam):
        T = mask.shape[-1]
        shape2 = (mask.numel() // T if T else 0, T)  # (rows, T), empty batches included
        rows = lambda t: t.reshape(shape2).float().contiguous()  # noqa: E731
        m = mask.reshape(shape2).to(torch.uint8).contiguous()
        adv, ret = _native.module().gae_forward(rows(rewards), rows(values), m, gamma, lam)
        ctx.save_for_backward(m)
        ctx.gamma, ctx.lam, ctx.dtypes, ctx.shape = gamma, lam, (rewards.dtype, values.dtype), mask.shape
        ctx.set_materialize_grads(False)
        return adv.view(mask.shape), ret.view(mask.shape)

    @staticmethod
    def backward(ctx, grad_adv, grad_ret):
        (m,) = ctx.saved_tensors
        zero = torch.zeros(m.shape, dtype=torch.float32)
        rows = lambda g: zero if g is None else g.reshape(m.shape).float().contiguous()  # noqa: E731
        g_r, g_v = _native.module().gae_backward(rows(grad_adv), rows(grad_ret), m, ctx.gamma, ctx.lam)
        return (g_r.view(ctx.shape).to(ctx.dtypes[0]), g_v.view(ctx.shape).to(ctx.dtypes[1]),
                None, None, None)


def _check(rewards, values, mask, gamma, lam):
    check_time_dim("rewards", rewards)
    extra = {} if values is None else {"values": values}
    check_per_token(rewards.shape, "rewards", rewards=rewards, **extra)
    check_mask(mask, rewards.shape, "rewards")
    check_same_device(rewards=rewards, mask=mask, **extra)
    return check_real("gamma", gamma, low=0.0, high=1.0), check_real("lam", lam, low=0.0, high=1.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 1.0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's valid positions -> (advantages, returns).

    rewards, values: (..., T) floating; mask: (..., T) bool; valid positions may be anywhere in a row
    (left or right padding, holes: holes are skipped, not read as zeros). gamma, lam in [0, 1].
    With gamma = lam = 1, A_k = sum(r_k..r_n) - V_k (the seed article's formula). Outputs are float32,
    0 at invalid positions, and differentiable with respect to rewards and values.
    """
    gamma, lam = _check(rewards, values, mask, gamma, lam)
    backend = resolve_backend(backend, rewards.device, native_dtype=rewards.dtype)
    if backend == "torch":
        adv, ret = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
        return adv.float(), ret.float()
    if backend == "native":
        return _NativeGAE.apply(rewards, values, mask, gamma, lam)
    return _GAE.apply(rewards, values, mask, gamma, lam)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                 backend: str = "auto") -> torch.Tensor:
    """G_k = r_k + gamma * G_next over each row's valid positions (a discounted reverse cumulative
    sum that skips holes). float32, 0 at invalid positions, differentiable with respect to rewards."""
    gamma, _ = _check(rewards, None, mask, gamma, 1.0)
    backend = resolve_backend(backend, rewards.device, native_dtype=rewards.dtype)
    if backend == "torch":
        return reference.reward_to_go(rewards, mask, gamma=gamma).float()
    if backend == "native":  # GAE with V = 0 and lam = 1 is the reward-to-go
        return _NativeGAE.apply(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]
    return _RewardToGo.apply(rewards, mask, gamma)


def compile_variants():
    """Example launches for the ahead-of-time compile check (tests/ops/test_compile.py): GAE (with
    values), reward-to-go (without) and the two mirrored scans of GAE's backward, on meta tensors."""
    rows = lambda dt=torch.float32: torch.empty((4, 3000), dtype=dt, device="meta")  # noqa: E731
    mask = rows(torch.bool)
    yield "gae-bf16", lambda: _scan(rows(torch.bfloat16), rows(torch.bfloat16), mask, 0.99,
                                    0.99 * 0.95)
    yield "reward_to_go-fp32", lambda: _scan(rows(), None, mask, 1.0, 0.99)
    yield "backward", lambda: (_forward_scan(rows(), mask, 0.99 * 0.95),
                               _previous_valid(rows(), mask))
