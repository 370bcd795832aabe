"""Atomic checkpoints and trainer state.

A checkpoint is written whole into `<dir>.tmp`, then swapped in by renames: the previous checkpoint
is moved to `<dir>.old` and removed only after the new one is in place, so a crash at any point leaves
a complete checkpoint at `<dir>` or, between the two renames, at `<dir>.old` (which `latest` finds).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

import torch


def save_atomic(directory, write: Callable[[Path], None]) -> None:
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def latest(directory) -> Path | None:
    """The complete checkpoint at `directory`, or the one a crash left at `<directory>.old`."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / "trainer_state.pt").exists():
            return candidate
    return None


def rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "generator": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def resume_from(out) -> tuple[Path, dict]:
    """(checkpoint directory, trainer state) of the run in `out`, for --resume."""
    found = latest(Path(out) / "checkpoint")
    if found is None:
        raise ValueError(f"resume: no checkpoint in {Path(out) / 'checkpoint'}")
    return found, torch.load(found / "trainer_state.pt", weights_only=False)
