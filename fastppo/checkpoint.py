"""Atomic checkpoints, and a trainer state that loads without running anything.

A checkpoint is written whole into `<dir>.tmp`, then swapped in by renames: the previous checkpoint
is moved to `<dir>.old` and removed only after the new one is in place, so a crash at any point leaves
a complete checkpoint at `<dir>` or, between the two renames, at `<dir>.old` (which `latest` finds).
A save therefore needs free space for a second checkpoint beside the first; when writing fails (disk
full), the aside copy is removed and the previous checkpoint stays.

A checkpoint's top level is a Hugging Face model directory that `from_pretrained` and vLLM load as it
is: the model's own files and nothing else a loader could take for a weight shard. What only fastppo
reads lies in `trainer/`:
    trainer/trainer_state.json         everything that is not a tensor: numbers, strings, lists,
                                       tagged tuples and int-keyed dicts, {"__tensor__": key} per tensor
    trainer/trainer_state.safetensors  the tensors, by key (optimizer, RNG states)
    trainer/value_head.safetensors     PPO's value head
    trainer/shards/                    under torchrun: the model and optimizer as each rank holds them,
                                       written by torch.distributed.checkpoint (see fastppo.distributed)
    trainer/manifest.json              the path, size and SHA-256 of every file the save wrote,
                                       written last
Checkpoints written before this layout keep the first three files at the top level; they still load.
Neither can carry code: json and safetensors only parse. A pickle can: whoever can write into an
output folder could run code in the next `--resume`. So checkpoints of the older format
(`trainer_state.pt`, a pickle) are refused on resume; `python -m fastppo.checkpoint convert DIR`
converts one, reading it with torch.load(weights_only=True), which admits tensors and plain
containers only.

fastppo deletes only what it wrote. Every save writes last, before the swap, a manifest
(`trainer/manifest.json`: the path, size and SHA-256 of every file it wrote); the aside copy is marked as
unfinished from the moment it is created. A copy (`<dir>`, `<dir>.old`, `<dir>.tmp`) may be deleted
only when it holds no file, or every file in it is in its manifest with its size; an unfinished aside
copy (a save killed part-way) counts as fastppo's too. Anything else is refused with a ValueError
naming the folder and the first file fastppo cannot account for. A checkpoint of an older fastppo has
no manifest: it still resumes, and the save that replaces it deletes it only when each of its files
has a counterpart in the new checkpoint (or is a file of the older layout); otherwise that save stops.

Every read and write of a checkpoint runs inside `checkpoint_io`, the one place that turns any
failure (safetensors, JSON, YAML, the file system, torch on a malformed state) into one line naming
the checkpoint: "checkpoint X is damaged: FILE: why" when reading; an OSError saying why when writing
(which fastppo.run.save turns into its one-line stop).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
FORMAT = "fastppo-trainer-state/1"
TRAINER = "trainer"
SHARDS = "shards"
MANIFEST = f"{TRAINER}/manifest.json"
MANIFEST_FORMAT = "fastppo-manifest/1"
# The files of the older layout, at a checkpoint's top level, which a new checkpoint has in trainer/.
OLDER_LAYOUT = (STATE_JSON, STATE_TENSORS, "head.safetensors", LEGACY_STATE + ".converted")


class Damaged(ValueError):
    """A checkpoint file that is not as fastppo wrote it: `file`, and why."""

    def __init__(self, file, why: str):
        super().__init__(f"{file}: {why}")
        self.file, self.why = Path(file), why


def state_dir(checkpoint) -> Path:
    """Where `checkpoint` keeps its trainer state: `trainer/`, or its top level in the older layout."""
    checkpoint = Path(checkpoint)
    older = (checkpoint / STATE_JSON).exists() or (checkpoint / LEGACY_STATE).exists()
    return checkpoint if older and not (checkpoint / TRAINER / STATE_JSON).exists() \
        else checkpoint / TRAINER


def aside(directory) -> Path:
    """Where save_atomic writes the next copy of `directory` before swapping it in."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".tmp")


def older(directory) -> Path:
    """Where save_atomic moves `directory` while it swaps the next copy in."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".old")


def copies(directory) -> tuple[Path, Path, Path]:
    """The folders a run's saves write and delete: `directory`, its .old and its aside (.tmp) copy."""
    return Path(directory), older(directory), aside(directory)


def save_atomic(directory, write: Callable[[Path], None], *, fresh: bool = True) -> None:
    """write(aside copy), its manifest, then swap it in. fresh=False: the aside copy exists already
    (start_aside), holding what other processes wrote into it (torchrun's shards); it is completed,
    not emptied. A copy that holds files fastppo did not write is never deleted: ValueError, before
    anything is written, or (a checkpoint of an older fastppo) before the swap."""
    directory = Path(directory)
    tmp, old = aside(directory), older(directory)
    check_replaceable(directory)
    if fresh:
        start_aside(tmp)
    try:
        with checkpoint_io(tmp, "write"):
            write(tmp)
            write_manifest(tmp)
        for copy in (directory, old):  # an older fastppo's checkpoint: its files, the new one's?
            why = not_fastppos(copy, counterpart=tmp)
            if why:
                raise ValueError(why)
    except BaseException:  # disk full, killed, ...: the aside copy goes, the last checkpoint stays
        drop_aside(tmp)
        raise
    with checkpoint_io(directory, "write"):
        if directory.exists():
            discard(old, counterpart=tmp)
            directory.rename(old)
        tmp.rename(directory)
    try:
        discard(old, counterpart=directory)
    except (OSError, ValueError):  # the new checkpoint is in place; the next save says why
        pass


def check_replaceable(directory) -> None:
    """Before a save writes anything: what its swap would delete (`directory` and its .old copy) is
    fastppo's, or a checkpoint of an older fastppo (checked against the new one before the swap);
    else a ValueError naming it."""
    for copy in (Path(directory), older(directory)):
        why = not_fastppos(copy, older_ok=True)
        if why:
            raise ValueError(why)


def start_aside(tmp) -> None:
    """An empty aside copy `tmp`, marked as unfinished until write_manifest completes it. One that a
    crash left is deleted first if it is fastppo's (else a ValueError naming it)."""
    tmp = Path(tmp)
    discard(tmp, unfinished=True)
    with checkpoint_io(tmp, "write"):
        (tmp / MANIFEST).parent.mkdir(parents=True)
        (tmp / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": None,
                                                "note": "a save in progress"}) + "\n")


def drop_aside(tmp) -> None:
    """Delete the aside copy of a save that failed, if it is fastppo's (it is, unless someone wrote
    into it meanwhile: then it stays)."""
    try:
        discard(tmp, unfinished=True)
    except (OSError, ValueError):
        pass


# -------------------------------------------------------------- what fastppo wrote: the manifest


def _files(directory: Path) -> dict[str, int | None]:
    """Everything in `directory` but its folders, by path relative to it ('/'-separated): the size
    of a regular file, None for anything else (a symbolic link, a socket, ...). Links are not
    followed."""
    def fail(error):
        raise error
    found = {}
    for root, dirs, files in os.walk(directory, onerror=fail):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            info = os.lstat(path)
            found[os.path.relpath(path, directory).replace(os.sep, "/")] = \
                info.st_size if stat.S_ISREG(info.st_mode) else None
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2 ** 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory) -> None:
    """Record every file in `directory` (a checkpoint fastppo has just written whole) with its size and
    SHA-256 in its manifest, written aside and renamed: the last file of a save. (Hashing reads the
    files back from the page cache, at about 1.7 GB/s on one core of a 2-core AMD EPYC: a few seconds
    for a 0.5B-parameter model and its optimizer.)"""
    directory = Path(directory)
    files = {k: v for k, v in _files(directory).items()
             if k not in (MANIFEST, MANIFEST + ".tmp") and not k.startswith(f"{MANIFEST}.")}
    odd = sorted(k for k, v in files.items() if v is None)
    if odd:
        raise ValueError(f"{directory / odd[0]} is not a regular file: not written by a save")
    tmp = directory / (MANIFEST + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    digests = {name: _sha256(directory / name) for name in files}
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files, "sha256": digests},
                              indent=1) + "\n")
    tmp.replace(directory / MANIFEST)


def read_manifest(directory, *, digests: bool = False) -> dict[str, int] | str | None:
    """`directory`'s manifest: the files a save wrote (path -> size), "unfinished" for an aside copy
    being written, None when it has none. A manifest that is not one is a Damaged. digests=True: path
    -> SHA-256 instead (empty for a manifest written before fastppo recorded them)."""
    path = Path(directory) / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 64 * 2**20:
            raise ValueError("not a regular file of a sensible size")
        body = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise Damaged(path, f"not a readable manifest ({_short(e)})") from None
    if isinstance(body, dict) and body.get("format") == MANIFEST_FORMAT:
        files = body.get("files")
        if files is None and "files" in body:
            return "unfinished"
        hashes = body.get("sha256", {})
        if isinstance(files, dict) and all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in files.items()) and isinstance(hashes, dict) and all(
                k in files and isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v)
                for k, v in hashes.items()):
            return hashes if digests else files
    raise Damaged(path, f"not a fastppo manifest (expected format {MANIFEST_FORMAT!r})")


def _is_checkpoint(directory: Path) -> bool:
    return (state_dir(directory) / STATE_JSON).exists() or (directory / LEGACY_STATE).exists()


def not_fastppos(directory, *, unfinished: bool = False, older_ok: bool = False,
                 counterpart=None) -> str | None:
    """None when fastppo may delete `directory`: it does not exist, holds no file, or holds only the
    files its manifest lists, each with its size. Otherwise why not, as one sentence naming it and
    the first file fastppo cannot account for. unfinished: an aside copy a save was writing (marked
    by start_aside) counts as fastppo's. A checkpoint of an older fastppo (no manifest) counts when
    older_ok, or when each of its files has a counterpart in the checkpoint `counterpart` fastppo has
    just written for the same run (the same path; at the top level, the older layout, also the same
    name in trainer/), or is a file of the older layout (OLDER_LAYOUT)."""
    directory = Path(directory)
    if not os.path.lexists(directory):
        return None
    if directory.is_symlink() or not directory.is_dir():
        return (f"{directory} is not a folder fastppo wrote (a file or a link); fastppo deletes only "
                "what it wrote: move or delete it by hand")
    try:
        files = _files(directory)
        if not files:
            return None
        manifest = read_manifest(directory)
    except (OSError, ValueError) as e:
        return (f"{directory} cannot be checked ({_short(e)}), so fastppo does not delete it: move "
                "or delete it by hand")
    if manifest is None and _is_checkpoint(directory):
        if older_ok:
            return None
        if counterpart is not None:
            theirs = set(_files(Path(counterpart)))
            unknown = [k for k in files if k not in theirs and k not in OLDER_LAYOUT  # the older
                       and ("/" in k or f"{TRAINER}/{k}" not in theirs)]  # layout: trainer/ on top
            if not unknown:
                return None
            return (f"{directory} is a checkpoint of an older fastppo (without a manifest of its "
                    f"files) and holds {_some(unknown)}, which fastppo does not write, so it does not "
                    "delete it: move that out of it, or delete the folder by hand")
        return (f"{directory} is a checkpoint of an older fastppo, written without a manifest of its "
                "files, so fastppo cannot tell them from files of yours and does not delete it: "
                "delete it by hand, or continue its run with --resume true")
    if manifest == "unfinished" and unfinished:
        return None
    listed = manifest if isinstance(manifest, dict) else {}
    unknown = [k for k, size in files.items() if k != MANIFEST and listed.get(k) != size]
    if not unknown:
        return None
    return (f"{directory} holds {_some(unknown)}, which fastppo did not write (or which changed since "
            "it did); fastppo deletes only what it wrote: move or delete it by hand")


def _some(names: list[str]) -> str:
    names = sorted(names)
    return names[0] + (f" and {len(names) - 1} more file(s)" if len(names) > 1 else "")


def discard(directory, *, unfinished: bool = False, counterpart=None) -> None:
    """Delete `directory` if fastppo wrote it (not_fastppos, checked here again), else a ValueError
    naming it and nothing deleted."""
    why = not_fastppos(directory, unfinished=unfinished, counterpart=counterpart)
    if why:
        raise ValueError(why)
    if os.path.lexists(directory):
        shutil.rmtree(directory)


# ------------------------------------------------------------------ one place for failing files


def _short(e: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(e).split()) if not isinstance(e, Damaged) else str(e)
    text = text if isinstance(e, (ValueError, OSError)) and text else f"{type(e).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def checkpoint_io(path, action: str, *, file=None):
    """Run one read ("read") or write ("write") of the checkpoint `path` (of its `file`, if one):
    whatever fails inside (a SafetensorError, a JSON or YAML error, an OSError, a TypeError of torch
    on a malformed state, any other Exception) comes out as one line naming it. Reading: a ValueError
    "checkpoint PATH is damaged: FILE: why" (a message that begins with "checkpoint " names its
    checkpoint already and passes as it is). Writing: an OSError (errno and strerror as the file
    system said them, e.g. ENOSPC from a SafetensorError's "os error 28"), which fastppo.run.save
    turns into its one-line stop."""
    path = Path(path)
    try:
        yield
    except Exception as e:
        if action == "write":
            if isinstance(e, OSError):
                raise
            code = re.search(r"os error (\d+)", str(e))
            number = int(code.group(1)) if code else None
            raise OSError(number, os.strerror(number) if number else _short(e),
                          str(file or path)) from e
        if isinstance(e, ValueError) and str(e).startswith("checkpoint "):
            raise
        where, why = (e.file, e.why) if isinstance(e, Damaged) else (file, _short(e))
        if where is not None:
            try:
                where = Path(where).relative_to(path)
            except ValueError:
                pass
        raise ValueError(f"checkpoint {path} is damaged: {f'{where}: ' if where else ''}{why}") \
            from None


def verify(checkpoint, *, contents: bool = True) -> None:
    """Refuse a checkpoint whose files are not as its save wrote them: each file its manifest lists
    is there with its size and (contents=True) its SHA-256 (a checkpoint of an older fastppo has no
    manifest, or sizes only), and every safetensors file's header is whole and fits the file. A
    Damaged naming the file."""
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if isinstance(manifest, dict):
        for name, size in sorted(manifest.items()):
            path = checkpoint / name
            if not os.path.lexists(path):
                raise Damaged(path, "missing: the checkpoint is incomplete")
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                raise Damaged(path, "not a regular file")
            if info.st_size != size:
                raise Damaged(path, f"{info.st_size} bytes, but {size} when it was written (cut "
                                    "short or changed)")
        for name, digest in sorted(read_manifest(checkpoint, digests=True).items() if contents
                                   else ()):
            if _sha256(checkpoint / name) != digest:
                raise Damaged(checkpoint / name, "its contents changed since it was written (its "
                                                 "SHA-256 is not the one its save recorded)")
    elif manifest == "unfinished":
        raise Damaged(checkpoint / MANIFEST, "the save that wrote it did not finish")
    from safetensors import safe_open

    for name, size in sorted(_files(checkpoint).items()):
        if name.endswith(".safetensors") and size is not None:
            try:
                with safe_open(str(checkpoint / name), framework="pt"):
                    pass
            except Exception as e:  # noqa: BLE001 (whatever the parser says, the file is damaged)
                raise Damaged(checkpoint / name, f"not a valid safetensors file ({_short(e)})") from None


def latest(directory) -> Path | None:
    """The checkpoint at `directory`, or the one a crash left at `<directory>.old`: a folder with a
    trainer state or a manifest (one with a manifest but not all its files is damaged, which verify
    says; a checkpoint of the older pickle format counts, so that resume can say what to do with
    it)."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if any(os.path.lexists(path) for path in (
                state_dir(candidate) / STATE_JSON, candidate / MANIFEST, candidate / LEGACY_STATE)):
            return candidate
    return None


# ---------------------------------------------------------------------------- the state's format


def _encode(obj, tensors: dict, path: str):
    """obj as JSON, its tensors moved into `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):  # optimizer state
            return {"__intdict__": {str(k): _encode(v, tensors, f"{path}/{k}")
                                    for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state: cannot store {type(obj).__name__} at {path or '/'}")


def _decode(obj, tensors: dict, where: str):
    """The inverse of _encode; anything else is refused with a ValueError naming `where`."""
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if not isinstance(obj["__tensor__"], str) or obj["__tensor__"] not in tensors:
                raise Damaged(where, f"tensor {str(obj['__tensor__'])[:100]!r} is missing from "
                                     f"{STATE_TENSORS}")
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"} and isinstance(obj["__tuple__"], list):
            return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
        if set(obj) == {"__intdict__"} and isinstance(obj["__intdict__"], dict):
            try:
                return {int(k): _decode(v, tensors, where) for k, v in obj["__intdict__"].items()}
            except ValueError:
                raise Damaged(where, "an __intdict__ has a key that is not an integer") from None
        if any(k.startswith("__") for k in obj):
            raise Damaged(where, f"unknown tag in {str(sorted(obj))[:200]}")
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise Damaged(where, f"unexpected {type(obj).__name__}")  # pragma: no cover (json types)


def save_state(directory, state: dict) -> None:
    """Write `state` (nested dicts, lists, tuples, numbers, strings, tensors) into `directory`. A
    state it cannot store is a TypeError; a failing write an OSError (checkpoint_io)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    body = {"format": FORMAT, "state": _encode(state, tensors, "")}
    with checkpoint_io(directory, "write"):
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / STATE_TENSORS))
        # The JSON marks the state complete (`latest` looks for it): written aside, then renamed.
        tmp = directory / (STATE_JSON + ".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        tmp.replace(directory / STATE_JSON)


def load_state(directory) -> dict:
    """The state `save_state` wrote into `directory`, or into a checkpoint `directory`'s state_dir.
    Nothing read here can run code; a malformed or tampered file is a Damaged (a ValueError) naming
    it. A checkpoint of the older pickle format is refused with what to do."""
    directory = state_dir(directory)
    json_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
    if not json_path.exists() and (directory / LEGACY_STATE).exists():
        raise ValueError(
            f"checkpoint {directory} holds a trainer state of the older format ({LEGACY_STATE}): a "
            f"pickle, which fastppo no longer loads because loading a pickle can run code. If you "
            f"trust it, convert it with `python -m fastppo.checkpoint convert {directory}` (reads "
            f"only tensors and plain containers) and resume again; or start a new run from the "
            f"weights in {directory}.")
    try:
        body = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise Damaged(json_path, "does not exist: not a fastppo checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(json_path, f"not valid JSON ({e})") from None
    except RecursionError:
        raise Damaged(json_path, "nested too deeply to be a trainer state") from None
    except (OSError, ValueError) as e:
        raise Damaged(json_path, f"cannot be read ({_short(e)})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or "state" not in body:
        raise Damaged(json_path, f"not a fastppo trainer state (expected format {FORMAT!r})")
    try:
        tensors = load_file(str(tensor_path))
    except FileNotFoundError:
        raise Damaged(tensor_path, "does not exist: the checkpoint is incomplete") from None
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError, ...: whatever the parser says)
        raise Damaged(tensor_path, f"not a valid safetensors file ({_short(e)})") from None
    try:
        state = _decode(body["state"], tensors, str(json_path))
    except RecursionError:
        raise Damaged(json_path, "nested too deeply to be a trainer state") from None
    if not isinstance(state, dict):
        raise Damaged(json_path, "the state must be an object")
    return state


def convert_legacy(directory) -> Path:
    """Convert a checkpoint's `trainer_state.pt` (the older format) into the json + safetensors pair,
    reading it with torch.load(weights_only=True): tensors and plain containers only, never code.
    The pickle is kept, renamed to `trainer_state.pt.converted`."""
    directory = Path(directory)
    legacy = directory / LEGACY_STATE
    if not legacy.exists():
        raise ValueError(f"{legacy} does not exist: nothing to convert")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        # Before 2.6 the weights_only unpickler could be bypassed (CVE-2025-32434).
        raise ValueError(f"converting {legacy} needs torch >= 2.6, whose weights_only loader is "
                         f"safe; this is torch {torch.__version__}")
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's restricted unpickler refuses anything but plain data
        raise ValueError(f"{legacy}: refused by torch.load(weights_only=True): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{legacy}: expected a dict of trainer state; got {type(state).__name__}")
    save_state(directory, state)
    legacy.rename(legacy.with_name(LEGACY_STATE + ".converted"))
    return directory


def _finite(value, low: float, high: float = math.inf, *, open_high: bool = False) -> bool:
    """A real number (or a 0-dim floating tensor) in [low, high] ([low, high) with open_high)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return low <= value and (value < high if open_high else value <= high)


FLAGS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
         "decoupled_weight_decay")


def check_param_groups(groups, where) -> None:
    """Refuse (Damaged, naming `where`) an optimizer state's param_groups whose hyperparameters are
    not what torch's AdamW takes, which would otherwise fail at the first step (a string lr is a
    TypeError in the fused kernel's dispatch) or train wrongly: lr, eps, weight_decay finite numbers
    >= 0, betas two numbers in [0, 1), the switches booleans (or None), params a list."""
    if not isinstance(groups, list) or not groups:
        raise Damaged(where, "the optimizer state has no list of param_groups")
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise Damaged(where, f"optimizer param group {i} is not an object with a list of params")
        for key in ("lr", "eps", "weight_decay"):
            if not _finite(group.get(key), 0):
                raise Damaged(where, f"optimizer param group {i}: {key} must be a finite number >= 0 "
                                     f"(found {str(group.get(key, 'nothing'))[:80]!r})")
        betas = group.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_finite(b, 0, 1, open_high=True) for b in betas)):
            raise Damaged(where, f"optimizer param group {i}: betas must be two numbers in [0, 1) "
                                 f"(found {str(betas)[:80]!r})")
        for key in FLAGS:
            if key in group and group[key] is not None and not isinstance(group[key], bool):
                raise Damaged(where, f"optimizer param group {i}: {key} must be true or false "
                                     f"(found {str(group[key])[:80]!r})")


# ------------------------------------------------------------------------------------ RNG states


def rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "generator": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def main(argv: list[str] | None = None) -> int:
    """`python -m fastppo.checkpoint convert DIR`: convert an older checkpoint's trainer state."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "convert":
        print("usage: python -m fastppo.checkpoint convert CHECKPOINT_DIR", file=sys.stderr)
        return 2
    try:
        print(f"converted {convert_legacy(argv[1])}: {STATE_JSON} + {STATE_TENSORS}")
    except (ValueError, OSError) as e:
        print(f"fastppo.checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
