"""The plumbing every trainer shares, as plain functions (no base class): set up, resume, save, and
stop on a non-finite loss or gradient. Each trainer (sft.py, rm.py, ppo.py) stays one linear loop
that calls them; what later changes for every trainer at once (dtype, process group, sharded saves,
rank-0 logging, barriers) changes here, once.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from fastppo import distributed
from fastppo.checkpoint import (SHARDS, STATE_JSON, TRAINER, Damaged, aside, check_param_groups,
                                check_replaceable, checkpoint_io, copies, discard, drop_aside, latest,
                                load_state, not_fastppos, rng_state, save_atomic, save_state,
                                set_rng_state, start_aside, state_dir, verify)

LOCK = ".fastppo.lock"
CONFIG = "config.yaml"
PATH_FIELDS = ("data", "model", "prompts", "policy", "reward_model", "out")
# What a resumed run may change without --allow_config_change: how long it runs, how often it saves,
# where it runs, and these switches. Anything else (data, models, seed, shapes, hyperparameters)
# would silently mix two runs in one folder.
MAY_CHANGE_ON_RESUME = ("steps", "iterations", "save_every", "device", "resume",
                        "allow_config_change", "overwrite")


class Stopped(RuntimeError):
    """A run stopped on purpose (a non-finite loss, gradient or weights, or a checkpoint that could
    not be written); its last good checkpoint stays. The CLI prints it as one line, exit code 1."""


def resolved_config(cfg) -> dict:
    """The config as saved with the run (OUT/config.yaml and every checkpoint): paths absolute."""
    values = dataclasses.asdict(cfg)
    return {k: str(Path(v).resolve()) if k in PATH_FIELDS and isinstance(v, str) else v
            for k, v in values.items()}


def check_output(cfg) -> None:
    """Refuse, before any work, a run that would lose or mix runs in cfg.out: an output folder that
    is not writable, in use by a live run, holding another run's checkpoint (without --resume or
    --overwrite), or, with --resume, a checkpoint that is damaged (fastppo.checkpoint.verify: sizes
    and headers; its config.yaml) or of a different config; and a run that would delete a folder
    holding files fastppo did not write (checkpoint, checkpoint.old, checkpoint.tmp: a fresh run
    deletes them as it starts, a resumed run's saves replace them). Changes nothing."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} exists and is not a directory")
    existing = next(p for p in (out, *out.resolve().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out {out} is not writable ({existing} is read-only for this user)")
    _refuse_if_held(out / LOCK)
    target = out / "checkpoint"
    found = latest(target)
    if cfg.resume:
        if found is None:
            raise ValueError(f"resume: no checkpoint in {target}")
        with checkpoint_io(found, "read"):
            verify(found)
            before = _saved_config(found / CONFIG)
        if before is not None and not cfg.allow_config_change:
            now = resolved_config(cfg)
            # a field added since that checkpoint was written had its default then
            before = {f.name: f.default for f in dataclasses.fields(cfg)
                      if f.default is not dataclasses.MISSING} | before
            changed = [f"{k}: {_clip(before.get(k))} -> {_clip(now.get(k))}"
                       for k in sorted(set(before) | set(now), key=str)
                       if k not in MAY_CHANGE_ON_RESUME and before.get(k) != now.get(k)]
            if changed:
                more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
                raise ValueError(f"resume: the checkpoint in {found} belongs to a run with another "
                                 f"config ({'; '.join(changed[:5])}{more}); pass "
                                 "--allow_config_change true to continue it anyway")
    elif found is not None and not cfg.overwrite:
        raise ValueError(f"out {out} already holds a run's checkpoint; pass --resume true to continue "
                         "it, or --overwrite true to delete it and start clean")
    for copy in copies(target):  # what this run may delete: fastppo's own copies only
        tmp = copy == aside(target)
        why = not_fastppos(copy, unfinished=tmp, older_ok=cfg.resume and not tmp)
        if why:
            raise ValueError(why)


class _PlainYAML(yaml.SafeLoader):
    """YAML without aliases: a config fastppo wrote has none, and aliases can expand a small file
    into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "an alias (*name): fastppo writes none",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _saved_config(path: Path) -> dict | None:
    """A checkpoint's config.yaml as a mapping; None if it has none. YAML tags are refused (never
    run), and so is anything but a mapping (a Damaged naming it)."""
    if not os.path.lexists(path):
        return None
    try:
        if path.stat().st_size > 2**20:
            raise ValueError("larger than a config (1 MiB)")
        loaded = yaml.load(path.read_text(), Loader=_PlainYAML)  # noqa: S506 (a SafeLoader)
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
        why = str(e) if not isinstance(e, yaml.MarkedYAMLError) or not e.problem else \
            e.problem + (f" at line {e.problem_mark.line + 1}" if e.problem_mark else "")
        raise Damaged(path, f"not a config fastppo wrote ({' '.join(why.split())[:200]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise Damaged(path, f"not a mapping of settings (a YAML {type(loaded).__name__})")
    return loaded


def _clip(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_config(cfg) -> None:
    """The checks of a run's config alone: cfg.check(), and under torchrun that each of its global
    sizes (cfg.GLOBAL_SIZES: batch_size, ...) splits evenly over the processes."""
    cfg.check()
    distributed.check_divides(**{name: getattr(cfg, name) for name in cfg.GLOBAL_SIZES})


def check_start(cfg) -> None:
    """The checks of where a run goes: its output folder (check_output), device and precision."""
    check_output(cfg)
    check_device(cfg.device)
    check_precision(cfg.dtype, cfg.device)


def owns_output(train: Callable) -> Callable:
    """Decorates a trainer `train(cfg)`, and is where a trainer's run is checked, once, however it is
    called (the CLI, the pipeline, Python): check_config(cfg) and check_start(cfg), unless the caller
    ran both (`checked=True`: the pipeline checks every stage before the first). Then hold a lock on
    cfg.out for the whole run (a second run into it is refused; a lock left by a dead process on
    this host is taken over), start clean with --overwrite, and save the resolved config as
    OUT/config.yaml."""
    @functools.wraps(train)
    def wrapped(cfg, *, checked: bool = False):
        if not checked:  # on every rank, before the process group starts: one message each
            check_config(cfg)
            check_start(cfg)
        with distributed.group(cfg.device) as device:  # torchrun: the process group
            return _owning(train, dataclasses.replace(cfg, device=device))
    return wrapped


def _owning(train: Callable, cfg):
    out, lock, failure = Path(cfg.out), None, None
    distributed.barrier()  # every rank has checked the folder before rank 0 locks it
    try:
        if distributed.is_main():  # under torchrun, rank 0 owns the folder
            try:
                lock = _prepare(out, cfg)
            except ValueError as e:
                failure = e
        if not distributed.agree(failure is None):  # every rank stops if rank 0 could not
            raise failure or ValueError(f"out {out}: rank 0 could not prepare it (it says why)")
        return train(cfg)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)


def _prepare(out: Path, cfg) -> Path:
    """Lock `out`, start clean (a fresh run deletes the checkpoint copies, each checked again to be
    fastppo's) and save the resolved config. A full disk or a folder that cannot be written is a
    ValueError, the lock given back. Returns the lock."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out {out} cannot be created ({e.strerror or e})") from None
    lock = _acquire(out / LOCK)
    try:
        if not cfg.resume:
            for copy in copies(out / "checkpoint"):
                discard(copy, unfinished=copy == aside(out / "checkpoint"))
        (out / CONFIG).write_text(yaml.safe_dump(resolved_config(cfg), sort_keys=False))
    except OSError as e:
        lock.unlink(missing_ok=True)
        raise ValueError(f"out {out} cannot be written ({e.strerror or e}"
                         f"{f': {e.filename}' if e.filename else ''})") from None
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    return lock


def _lock_holder(path: Path) -> dict | None:
    """Who holds the lock at `path` (None: nobody), and whether it is stale: its process is gone
    from this host, or the file is unreadable (a crash while writing it)."""
    try:
        holder = json.loads(path.read_text())
        about = f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        return {"stale": True, "about": "unreadable lock"}
    stale = False
    if holder["host"] == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            stale = True
        except (PermissionError, ValueError, OverflowError):
            pass  # alive under another user, or a pid that cannot be asked: held
    return {"stale": stale, "about": about}


def _refuse_if_held(path: Path) -> None:
    holder = _lock_holder(path)
    if holder is not None and not holder["stale"]:
        raise ValueError(f"out {path.parent} is in use by another fastppo run ({holder['about']}); "
                         f"wait for it to end, or delete {path} if that run is gone")


def _acquire(path: Path) -> Path:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_if_held(path)
            path.unlink(missing_ok=True)  # stale: taken over
            continue
        except OSError as e:  # no room for a file, a read-only file system, ...
            raise ValueError(f"out {path.parent}: could not write the lock {path} "
                             f"({e.strerror or e})") from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        except OSError as e:  # a full disk: the half-written lock goes
            path.unlink(missing_ok=True)
            raise ValueError(f"out {path.parent}: could not write the lock {path} "
                             f"({e.strerror or e})") from None
        return path
    raise ValueError(f"out {path.parent}: could not take the lock {path}")


def setup(seed: int, device: str) -> torch.Generator:
    """Check the device, seed torch's global RNG (which initialises new heads) and return the
    generator that draws every data-order and sampling choice of the run (on CPU whatever the
    device, so that a seed draws the same choices everywhere)."""
    check_device(device)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def check_device(device: str) -> None:
    """`device` names a torch device this machine has, else a ValueError saying what is wrong."""
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


def check_precision(dtype: str, device: str) -> None:
    """bfloat16 runs on this device, else a ValueError before any work."""
    dev = torch.device(device)
    if dtype == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype 'bfloat16' is not supported on {device} "
                         f"({torch.cuda.get_device_name(dev)}); use dtype 'float32'")


def resume(out, load_model: Callable[[Path], None], optimizer: torch.optim.Optimizer,
           generator: torch.Generator, *, model: torch.nn.Module | None = None,
           **counters: type) -> dict:
    """Continue the run in `out` (for --resume): restore the optimizer, load the weights
    (load_model(checkpoint directory)), then restore every RNG. Returns the saved `counters`
    (name=type: step=int, kl_coef=float), each checked. The state is read and checked (its files'
    sizes and headers (their SHA-256 too, in check_start), counters, RNG states, the optimizer's groups) before the weights or any RNG
    change, so a refused checkpoint leaves the run as it was. Whatever fails while reading it is one
    line naming the checkpoint (fastppo.checkpoint.checkpoint_io)."""
    found = latest(Path(out) / "checkpoint")
    if found is None:
        raise ValueError(f"resume: no checkpoint in {Path(out) / 'checkpoint'}")
    with checkpoint_io(found, "read"):
        verify(found, contents=False)  # (check_start, run before every trainer, hashed its files)
        state = load_state(state_dir(found))
        values = _check_state(state, found, optimizer, counters)
        shards = state_dir(found) / SHARDS  # written under torchrun: model and optimizer, by rank
        try:  # on throwaway generators: nothing of the run changes if a state is malformed
            torch.Generator().set_state(state["rng"]["torch"])
            torch.Generator().set_state(state["rng"]["generator"])
            random.Random().setstate(state["rng"]["python"])
            if not shards.is_dir():  # checks every group before changing any; by name into `model`
                distributed.load_optimizer_state(model, optimizer, state["optimizer"])
            else:
                groups = state["optimizer"]["param_groups"]
                if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
                    raise ValueError("the optimizer's parameter groups differ")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint {found}: the trainer state in {state_dir(found)} does not "
                             f"fit this run ({type(e).__name__}: {' '.join(str(e).split())[:300]})") \
                from None
        if shards.is_dir():  # each rank reads the pieces of model and optimizer it holds now
            distributed.load_shards(model, optimizer, shards, state["optimizer"]["param_groups"])
        else:
            load_model(found)
    set_rng_state(state["rng"], generator)
    return values


def _check_state(state: dict, found: Path, optimizer: torch.optim.Optimizer,
                 counters: dict[str, type]) -> dict:
    """The saved `counters`, each checked, once the state's entries are checked: the optimizer's
    hyperparameters (fastppo.checkpoint.check_param_groups) and, for a state of parameters by
    position (one process), each moment's shape against its parameter. A Damaged naming the file."""
    where = state_dir(found) / STATE_JSON
    for key in ("optimizer", "rng"):
        if not isinstance(state.get(key), dict):
            raise Damaged(where, f"the trainer state has no {key!r} entry")
    check_param_groups(state["optimizer"].get("param_groups"), where)
    saved, moments = state["optimizer"]["param_groups"], state["optimizer"].get("state", {})
    if not isinstance(moments, dict):
        raise Damaged(where, "the optimizer state's 'state' is not an object")
    by_position = {}
    if len(saved) == len(optimizer.param_groups):
        for was, now in zip(saved, optimizer.param_groups):
            if len(was["params"]) == len(now["params"]):
                by_position.update(zip(map(str, was["params"]), now["params"]))
    for key, entry in moments.items():
        if not isinstance(entry, dict) or not all(isinstance(v, torch.Tensor) for v in entry.values()):
            raise Damaged(where, f"the optimizer state of parameter {str(key)[:40]!r} is not a set "
                                 "of tensors")
        param = by_position.get(str(key))
        for name, value in entry.items():
            if name == "step":
                if value.numel() != 1 or not torch.isfinite(value.float()).all():
                    raise Damaged(where, f"optimizer step of parameter {key} is not one finite number")
            elif param is not None and not isinstance(key, str) and value.shape != param.shape:
                raise Damaged(where, f"optimizer {name} of parameter {key} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
    values = {}
    for name, kind in counters.items():
        value = state.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = isinstance(value, int) and number if kind is int else number and math.isfinite(value)
        if not ok:
            raise Damaged(where, f"the trainer state has no {kind.__name__} {name!r} "
                                 f"(found {str(value)[:80]!r})")
        values[name] = kind(value)
    return values


def save(out, write_model: Callable[[Path, dict | None], None], optimizer: torch.optim.Optimizer,
         generator: torch.Generator, *, model: torch.nn.Module | None = None, **counters) -> None:
    """Write `out/checkpoint` atomically: the weights (write_model(directory, state)), then the trainer
    state: optimizer, RNG states and `counters` (numbers such as step, kl_coef), then the manifest of
    what it wrote (fastppo.checkpoint). Weights that are not finite are never written, and a save
    that fails (disk full: whatever a writer raises, fastppo.checkpoint.checkpoint_io; or a copy it
    would replace holding files fastppo did not write) leaves no partial copy: either way the run
    stops (Stopped, one line) and the last good checkpoint stays.

    Under torchrun every rank calls it: each writes its shards of `model` and the optimizer into the
    aside copy (trainer/shards, which loads at any world size), rank 0 gathers `model`'s whole state
    dict (`state`) to write the consolidated model, completes the copy and swaps it in. On one
    process `state` is None (write_model saves the model as it is) and the trainer state holds the
    optimizer."""
    at = ", ".join(f"{k} {v}" for k, v in counters.items() if isinstance(v, int))
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    if not distributed.all_finite(trained):
        raise Stopped(f"the weights are not finite at {at}; stopping without saving. "
                      f"{_last_good(out)}")
    target = Path(out) / "checkpoint"
    sharded = distributed.world() > 1
    state, optimizer_state = None, optimizer.state_dict()
    if sharded:
        tensors, groups = distributed.sharded_state(model, optimizer)
        optimizer_state = {"param_groups": groups}  # the moments are in the shards
        state = distributed.full_state_dict(model, main_only=True)

    def write(directory):
        write_model(directory, state)
        if (Path(out) / CONFIG).is_file():  # the run's resolved config travels with its checkpoint
            shutil.copyfile(Path(out) / CONFIG, directory / CONFIG)
        save_state(directory / TRAINER, {"optimizer": optimizer_state, "rng": rng_state(generator),
                                         **counters})

    def shards():
        with checkpoint_io(aside(target), "write"):
            distributed.save_shards(tensors, aside(target) / TRAINER / SHARDS)
    if not sharded:
        failure = _main_does(lambda: save_atomic(target, write))
    else:  # rank 0 starts the aside copy, every rank writes its shards into it, rank 0 completes it
        failure = _main_does(lambda: (check_replaceable(target), start_aside(aside(target))))
        if distributed.agree(failure is None):
            failure = _attempt(shards)
            if distributed.agree(failure is None):
                failure = _main_does(lambda: save_atomic(target, write, fresh=False))
    if distributed.agree(failure is None):
        return
    if distributed.is_main():
        drop_aside(aside(target))
    if isinstance(failure, ValueError):  # a copy it would replace is not fastppo's
        raise Stopped(f"could not write the checkpoint at {at} ({failure}); stopping. "
                      f"{_last_good(out)}") from None
    last = latest(target)
    need = f" (about {_size(last) / 2**20:.0f} MiB: the last one's size)" if last is not None else ""
    why = "on another rank" if failure is None else \
        getattr(failure, "strerror", None) or " ".join(str(failure).split())[:300]
    raise Stopped(f"could not write the checkpoint at {at} ({why}); stopping. {_last_good(out)}. A "
                  f"save needs room for a second checkpoint beside the first{need}") from failure


def _attempt(action: Callable[[], None]) -> Exception | None:
    """What writing raised (disk full, quota, folder gone: an OSError, whatever the writer raised,
    fastppo.checkpoint.checkpoint_io; a copy that is not fastppo's: a ValueError; under torchrun,
    DCP's CheckpointException carrying any rank's failure), or None."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        action()
    except (OSError, ValueError, CheckpointException) as e:
        return e
    return None


def _main_does(action: Callable[[], None]) -> Exception | None:
    """_attempt on rank 0; None elsewhere."""
    return _attempt(action) if distributed.is_main() else None


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The 2-norm of every trained parameter's gradient (for stop_if_not_finite before a step)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def step(optimizer: torch.optim.Optimizer, loss, out, *, what: str, at: str,
         max_norm: float | None = None, model: torch.nn.Module | None = None) -> torch.Tensor:
    """One optimizer step on `loss` (this rank's share of the global loss; or an iterable of the
    shares of its micro-batches, each backpropagated as it comes, their gradients accumulated), as
    every trainer takes it: stopped (Stopped, the last good checkpoint kept) before the step if the
    global loss or the gradient norm is not finite, so no non-finite weight is ever written.
    max_norm: clip `model`'s gradients to it first. Returns the global loss (the shares summed over
    micro-batches and ranks / world size). The loss is normalised by its caller, once, by the global
    count it averages over: a micro-batch's share is its part of that mean, never its own mean."""
    optimizer.zero_grad(set_to_none=True)
    total = None
    for part in ([loss] if isinstance(loss, torch.Tensor) else loss):
        part.backward()
        total = part.detach() if total is None else total + part.detach()
    value = distributed.summed(total) / distributed.world()
    stop_if_not_finite(value, out, what=f"{what} loss", at=at)
    norm = gradient_norm(optimizer) if max_norm is None else \
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    stop_if_not_finite(norm, out, what=f"{what} gradient norm", at=at)
    optimizer.step()
    return value


def stop_if_not_finite(loss: torch.Tensor, out, *, what: str, at: str) -> None:
    """Stop the run on a NaN or infinite loss or gradient norm (one device sync) before it reaches
    the weights; the last checkpoint stays as it is."""
    if not torch.isfinite(loss):
        raise Stopped(f"{what} is not finite at {at} ({loss.item()}); stopping. {_last_good(out)}")


def _last_good(out) -> str:
    found = latest(Path(out) / "checkpoint")
    return (f"The last good checkpoint is in {found}" if found is not None
            else "No checkpoint had been saved yet")


def begin(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          generator: torch.Generator, *, name: str, total: int, **counters: type):
    """The prologue every trainer shares: with cfg.resume, the checkpoint in cfg.out restored
    (weights through fastppo.models.restore_model, optimizer, RNG; `counters` as in resume), else
    nothing. Returns (the saved counters, or {} for a fresh run; the metrics log; a progress bar over
    the remaining steps of `total`, which counts from the first counter)."""
    from fastppo.metrics import MetricsLog
    from fastppo.models import restore_model
    from tqdm.auto import tqdm

    saved = {}
    if cfg.resume:
        saved = resume(cfg.out, lambda directory: restore_model(model, directory, cfg.device),
                       optimizer, generator, model=model, **counters)
    start = saved.get(next(iter(counters)), 0)
    log = MetricsLog(cfg.out, resume_step=start if cfg.resume else None)
    progress = tqdm(range(start, total), desc=name, initial=start, total=total,
                    disable=None)  # a progress line on a terminal, nothing in logs
    return saved, log, progress
