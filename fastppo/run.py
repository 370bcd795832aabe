"""The plumbing every trainer shares, as plain functions (no base class): set up, resume, save, and
stop on a non-finite loss or gradient. Each trainer (sft.py, rm.py, ppo.py) stays one linear loop
that calls them; what later changes for every trainer at once (dtype, process group, sharded saves,
rank-0 logging, barriers) changes here, once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fastppo.checkpoint import latest, load_state, rng_state, save_atomic, save_state, set_rng_state


def setup(seed: int, device: str) -> torch.Generator:
    """Check the device, seed torch's global RNG (which initialises new heads) and return the
    generator that draws every data-order and sampling choice of the run (on CPU whatever the
    device, so that a seed draws the same choices everywhere)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0'; got {device!r} "
                         f"({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resume(out, load_model: Callable[[Path], None], optimizer: torch.optim.Optimizer,
           generator: torch.Generator, counter: str) -> dict:
    """Continue the run in `out` (for --resume): load the weights (load_model(checkpoint
    directory)), then restore the optimizer and every RNG. Returns the saved state, whose `counter`
    ("step" or "iteration") says where to continue. The state is read and checked before anything
    is loaded, so a refused checkpoint changes nothing."""
    found = latest(Path(out) / "checkpoint")
    if found is None:
        raise ValueError(f"resume: no checkpoint in {Path(out) / 'checkpoint'}")
    state = load_state(found)
    for key in ("optimizer", "rng"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"resume: the trainer state in {found} has no {key!r} entry")
    if isinstance(state.get(counter), bool) or not isinstance(state.get(counter), int):
        raise ValueError(f"resume: the trainer state in {found} has no integer {counter!r}")
    load_model(found)
    try:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"resume: the trainer state in {found} does not fit this run "
                         f"({type(e).__name__}: {e})") from None
    return state


def save(out, write_model: Callable[[Path], None], optimizer: torch.optim.Optimizer,
         generator: torch.Generator, **counters) -> None:
    """Write `out/checkpoint` atomically: the weights (write_model(directory)), then the trainer
    state: optimizer, RNG states and `counters` (numbers such as step, kl_coef). Weights that are not
    finite are never written: the run stops and the last good checkpoint stays."""
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    if not all(bool(torch.isfinite(p).all()) for p in trained):
        at = ", ".join(f"{k} {v}" for k, v in counters.items() if isinstance(v, int))
        raise RuntimeError(f"the weights are not finite at {at}; stopping without saving. The last "
                           f"good checkpoint is in {Path(out) / 'checkpoint'}")

    def write(directory):
        write_model(directory)
        save_state(directory, {"optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                               **counters})
    save_atomic(Path(out) / "checkpoint", write)


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The 2-norm of every trained parameter's gradient (for stop_if_not_finite before a step)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def stop_if_not_finite(loss: torch.Tensor, out, *, what: str, at: str) -> None:
    """Stop the run on a NaN or infinite loss or gradient norm (one device sync) before it reaches
    the weights; the last checkpoint stays as it is."""
    if not torch.isfinite(loss):
        raise RuntimeError(f"{what} is not finite at {at} ({loss.item()}); stopping. The last good "
                           f"checkpoint is in {Path(out) / 'checkpoint'}")
