"""Argument checks and backend choice, shared by every op and every backend.

Each check raises a `TypeError` (wrong kind of thing) or `ValueError` (right kind, wrong value) that
names the argument and says what was expected, before any kernel runs.
"""
from __future__ import annotations

import math
import os
from numbers import Real

import torch

BACKENDS = ("auto", "triton", "native", "torch")
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it is chosen by TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, native_dtype: torch.dtype | None = None) -> str:
    """"auto" (or FASTPPO_BACKEND when set) -> "triton" on CUDA tensors; on CPU "native" where the op
    has C++ kernels (native_dtype is its logits' dtype, None for ops without) and they build, else
    "torch", the chunked reference. Ops without native kernels run "native" as "torch"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTPPO_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"FASTPPO_BACKEND must be one of {BACKENDS}; got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        if device.type == "cpu" and native_dtype in NATIVE_DTYPES:
            from fastppo.kernels import _native
            return "native" if _native.available() else "torch"
        return "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU use backend='torch', "
                "or set TRITON_INTERPRET=1 before importing triton to run the kernels interpreted"
            )
    if backend == "native":
        if native_dtype is None:
            return "torch"
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors; got {device.type}")
        if native_dtype not in NATIVE_DTYPES:
            raise ValueError(f"backend='native' takes float32, bfloat16 or float16 logits; "
                             f"got {native_dtype}")
        from fastppo.kernels import _native
        _native.module()  # raises with the build error
    return backend


def check_tensor(name: str, x, dtypes: tuple[torch.dtype, ...], kind: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {kind} tensor ({names}); got {x.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return value


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return value


def check_token_inputs(logits, labels, temperature, ignore_index, validate) -> float:
    """Checks shared by token_logprobs and ppo_loss; returns temperature as a float."""
    check_tensor("logits", logits, FLOAT_DTYPES, "a floating-point")
    check_tensor("labels", labels, INT_DTYPES, "an integer")
    if logits.dim() < 1:
        raise ValueError("logits must have shape (..., V) with a vocabulary dimension; got a scalar")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has an empty vocabulary (shape {tuple(logits.shape)}); V must be >= 1")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}; "
                         f"got {tuple(labels.shape)}")
    check_same_device(logits=logits, labels=labels)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if validate and labels.numel():
        vocab = logits.shape[-1]
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):  # one device sync; validate=False skips it
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {first} ({int(bad.sum())} such labels)")
    return temperature


def check_per_token(shape: torch.Size, shape_from: str, **tensors) -> None:
    """Floating tensors that must all have `shape` (named after the argument it came from)."""
    for name, t in tensors.items():
        check_tensor(name, t, FLOAT_DTYPES, "a floating-point")
        if t.shape != shape:
            raise ValueError(f"{name} must have the shape of {shape_from}, {tuple(shape)}; "
                             f"got {tuple(t.shape)}")


def check_mask(mask, shape: torch.Size, shape_from: str) -> None:
    check_tensor("mask", mask, (torch.bool,), "a bool")
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape of {shape_from}, {tuple(shape)}; "
                         f"got {tuple(mask.shape)}")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def check_real(name: str, value, *, low: float | None = None, low_open: bool = False,
               high: float | None = None, high_open: bool = False) -> float:
    """A finite real number within [low, high] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be a finite number {' and '.join(p for p in (lo, hi) if p)}; "
                         f"got {value}")
    return value


def check_rows_have_valid(mask: torch.Tensor, what: str) -> None:
    """Every row (all but the last dim) has a valid position (one device sync)."""
    empty = ~mask.any(-1)
    if bool(empty.any()):
        row = tuple(empty.nonzero()[0].tolist())
        raise ValueError(f"mask row {row[0] if len(row) == 1 else row} has no valid position; {what}")


def check_time_dim(name: str, x) -> None:
    """A per-token tensor of shape (..., T): rows in the leading dims, time in the last."""
    check_tensor(name, x, FLOAT_DTYPES, "a floating-point")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., T) with a time dimension; got a scalar")
