"""The sampler's random numbers as a pure function of (seed, iteration, global row, step).

A uniform drawn from a generator depends on how many were drawn before it: split a batch over two
ranks, or generate it in two pieces, and every row gets other numbers. Keyed by the row's place in
the global batch instead, a row samples the same tokens however the batch is split (up to the
float rounding of the model's forward, which moves a token only when its uniform falls within
rounding of a CDF boundary), so runs do not change with the number of devices.

The hash is splitmix64's finaliser (Steele, Lea, Flood 2014), chained over the four keys, in int64
tensor arithmetic (wrapping multiplication, logical shifts): the same numbers on every device.
"""
from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131   # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687     # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685     # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def keyed_uniforms(seed: int, iteration: int, rows: torch.Tensor, step: int) -> torch.Tensor:
    """One float64 uniform in [0, 1) per entry of `rows` (the global row indices, int64), a pure
    function of (seed, iteration, row, step), on `rows`' device."""
    x = torch.full_like(rows, seed, dtype=torch.int64)
    for part in (iteration, rows.to(torch.int64), step):
        x = _mix(x * _GOLDEN + part + _GOLDEN)  # + a constant: key (0, 0, 0, 0) is not 0
    return _shift_right(x, 11).to(torch.float64) * 2.0 ** -53


def keyed_seeds(seed: int, iteration: int, rows: torch.Tensor, turn: int = 0) -> list[int]:
    """One seed in [0, 2**63) per entry of `rows`, a pure function of (seed, iteration, row, turn):
    the per-request seed of an engine that draws its own random numbers (vLLM), so that a row
    samples the same tokens however the batch is split. Keyed apart from the uniforms (step -1 -
    turn)."""
    x = torch.full_like(rows, seed, dtype=torch.int64)
    for part in (iteration, rows.to(torch.int64), -1 - turn):
        x = _mix(x * _GOLDEN + part + _GOLDEN)
    return _shift_right(x, 1).tolist()
