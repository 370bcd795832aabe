"""Triton, or a stand-in where it has no wheels (macOS, Windows): the kernels below are then
plain functions that are never launched, and every op runs on backend="torch"."""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Linux CI always has triton
    from types import SimpleNamespace

    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f),
                             next_power_of_2=lambda n: 1 << (max(n, 1) - 1).bit_length())
    tl = SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["HAS_TRITON", "triton", "tl"]
