"""Evaluate a row-wise reference in chunks, so the `"torch"` backend never holds an (N, V) float32
temporary: forward runs each chunk without autograd; backward recomputes each chunk with autograd
and writes its gradient into one buffer of the input's dtype (activation checkpointing per chunk).
"""
from __future__ import annotations

from typing import Callable

import torch

from fastppo.kernels._layout import as_outer_inner

# Rows per chunk are chosen so a chunk's float32 temporaries stay near 16 MB each.
CHUNK_ELEMENTS = 1 << 22


def _chunks(outer: int, inner: int, vocab: int) -> list[tuple]:
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if inner <= rows:  # whole inner rows fit: group several outer indices
        step = max(1, rows // max(inner, 1))
        return [(slice(i, min(i + step, outer)),) for i in range(0, outer, step)]
    return [(i, slice(j, min(j + rows, inner))) for i in range(outer) for j in range(0, inner, rows)]


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x, *args):
        lead = x.shape[:-1]
        x, args = _rows(x, args)
        outer, inner, vocab = x.shape
        chunks = _chunks(outer, inner, vocab)
        outs = None
        with torch.no_grad():
            for c in chunks:
                res = fn(x[c], *(a[c] for a in args))
                if outs is None:
                    outs = [torch.empty((outer, inner), dtype=r.dtype, device=x.device) for r in res]
                for o, r in zip(outs, res):
                    o[c] = r
        if outs is None:  # zero rows: ask fn for the output count on an empty chunk
            res = fn(x[:0], *(a[:0] for a in args))
            outs = [torch.empty((outer, inner), dtype=r.dtype, device=x.device) for r in res]
        ctx.fn, ctx.chunks, ctx.shape = fn, chunks, lead + (vocab,)
        ctx.save_for_backward(x, *args)
        ctx.set_materialize_grads(False)
        return tuple(o.view(lead) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        x, *args = ctx.saved_tensors
        grads = [g if g is None else g.reshape(x.shape[:2]) for g in grads]
        # Rows of x are in the caller's row-major order, so this buffer views back to its shape.
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for c in ctx.chunks:
            with torch.enable_grad():
                xc = x[c].detach().requires_grad_()
                res = ctx.fn(xc, *(a[c] for a in args))
                pairs = [(r, g[c]) for r, g in zip(res, grads) if g is not None]
                (gx,) = torch.autograd.grad([r for r, _ in pairs], xc, [g for _, g in pairs],
                                            allow_unused=True) if pairs else (None,)
            grad_x[c] = 0 if gx is None else gx
        return (None, grad_x.view(ctx.shape)) + (None,) * len(args)


def _rows(x: torch.Tensor, args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x as an (outer, inner, V) view (a copy only if its rows need more than two strides)."""
    x3 = as_outer_inner(x)  # a view, or one copy if the rows need 3+ strides
    return x3, [a.reshape(x3.shape[:2]) for a in args]


def rowwise(fn: Callable[..., tuple[torch.Tensor, ...]], x: torch.Tensor,
            *row_args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply `fn(x_rows, *row_args_rows) -> tuple of per-row tensors` over x's (..., V) rows in chunks.

    `row_args` have shape x.shape[:-1]. The gradient flows to `x` only. Outputs have shape x.shape[:-1].
    """
    return _Chunked.apply(fn, x, *row_args)
