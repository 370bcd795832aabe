"""Strided layouts: read a (..., V) view without copying it."""
from __future__ import annotations

import torch


def collapse_rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Sizes and strides of x's leading dimensions, with mergeable neighbours merged.

    Dims i and i+1 merge when stride[i] == size[i+1] * stride[i+1]; size-1 dims drop out. A
    contiguous tensor gives one dim; `logits[:, :-1]` gives two (batch, time): no copy is needed.
    """
    sizes, strides = [], []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if sizes and strides[-1] == size * stride:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    return sizes or [1], strides or [0]


def as_outer_inner(x: torch.Tensor) -> torch.Tensor:
    """A (..., V) tensor with a contiguous last dim as (outer, inner, V): a view when its rows need at
    most two strides (every contiguous tensor, `logits[:, :-1]`), else one contiguous copy."""
    sizes, strides = collapse_rows(x)
    if len(sizes) > 2:
        return x.reshape(1, -1, x.shape[-1])
    if len(sizes) == 1:
        sizes, strides = [1] + sizes, [0] + strides
    return x.as_strided((sizes[0], sizes[1], x.shape[-1]), (strides[0], strides[1], 1))
