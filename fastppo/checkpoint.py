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
Checkpoints written before this layout keep the first three files at the top level; they still load.
Neither can carry code: json and safetensors only parse. A pickle can: whoever can write into an
output folder could run code in the next `--resume`. So checkpoints of the older format
(`trainer_state.pt`, a pickle) are refused on resume; `python -m fastppo.checkpoint convert DIR`
converts one, reading it with torch.load(weights_only=True), which admits tensors and plain
containers only.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
FORMAT = "fastppo-trainer-state/1"
TRAINER = "trainer"
SHARDS = "shards"


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


def save_atomic(directory, write: Callable[[Path], None], *, fresh: bool = True) -> None:
    """write(aside copy), then swap it in. fresh=False: the aside copy exists already, holding what
    other processes wrote into it (torchrun's shards); it is completed, not emptied."""
    directory = Path(directory)
    tmp, old = aside(directory), directory.with_name(directory.name + ".old")
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:  # disk full, killed, ...: the aside copy goes, the last checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def latest(directory) -> Path | None:
    """The complete checkpoint at `directory`, or the one a crash left at `<directory>.old`
    (a checkpoint of the older pickle format counts, so that resume can say what to do with it)."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (state_dir(candidate) / STATE_JSON).exists() or (candidate / LEGACY_STATE).exists():
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
                raise ValueError(f"{where}: tensor {obj['__tensor__']!r} is missing from "
                                 f"{STATE_TENSORS}")
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"} and isinstance(obj["__tuple__"], list):
            return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
        if set(obj) == {"__intdict__"} and isinstance(obj["__intdict__"], dict):
            try:
                return {int(k): _decode(v, tensors, where) for k, v in obj["__intdict__"].items()}
            except ValueError:
                raise ValueError(f"{where}: an __intdict__ has a key that is not an integer") from None
        if any(k.startswith("__") for k in obj):
            raise ValueError(f"{where}: unknown tag in {sorted(obj)}")
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"{where}: unexpected {type(obj).__name__}")  # pragma: no cover (json types)


def save_state(directory, state: dict) -> None:
    """Write `state` (nested dicts, lists, tuples, numbers, strings, tensors) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    body = {"format": FORMAT, "state": _encode(state, tensors, "")}
    save_file(tensors, str(directory / STATE_TENSORS))
    # The JSON marks the state complete (`latest` looks for it): written aside, then renamed.
    tmp = directory / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(directory / STATE_JSON)


def load_state(directory) -> dict:
    """The state `save_state` wrote into `directory`, or into a checkpoint `directory`'s state_dir.
    Nothing read here can run code; a malformed or tampered file is a ValueError naming it. A
    checkpoint of the older pickle format is refused with what to do."""
    directory = state_dir(directory)
    json_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
    if not json_path.exists() and (directory / LEGACY_STATE).exists():
        raise ValueError(
            f"{directory / LEGACY_STATE} is a trainer state of the older format: a pickle, which "
            f"fastppo no longer loads because loading a pickle can run code. If you trust it, "
            f"convert it with `python -m fastppo.checkpoint convert {directory}` (reads only "
            f"tensors and plain containers) and resume again; or start a new run from the weights "
            f"in {directory}.")
    try:
        body = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{json_path} does not exist: not a fastppo checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{json_path}: nested too deeply to be a trainer state") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or "state" not in body:
        raise ValueError(f"{json_path}: not a fastppo trainer state (expected format {FORMAT!r})")
    try:
        tensors = load_file(str(tensor_path))
    except FileNotFoundError:
        raise ValueError(f"{tensor_path} does not exist: the checkpoint is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{tensor_path}: not a valid safetensors file ({e})") from None
    try:
        state = _decode(body["state"], tensors, str(json_path))
    except RecursionError:
        raise ValueError(f"{json_path}: nested too deeply to be a trainer state") from None
    if not isinstance(state, dict):
        raise ValueError(f"{json_path}: the state must be an object")
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
    except ValueError as e:
        print(f"fastppo.checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
