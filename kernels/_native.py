"""Native CPU kernels (csrc/), compiled on first use with torch.utils.cpp_extension.

Nothing is built at install time (a build-time torch would pull a CUDA wheel). The first call of a
native op compiles csrc/*.cpp with the system C++ compiler and ninja into one module: one source per
op (token_logprobs.cpp, ppo_loss.cpp, gae.cpp; a new op's .cpp is picked up with no edit here), the
shared row helpers in the header rows.h, and bindings.cpp, the one file with the pybind11 module and
its m.def of each op. The build goes to the cache directory
    $FASTPPO_CACHE/native, or ~/.cache/fastppo/native   (XDG_CACHE_HOME is honoured)
one build per CPU capability (AVX512, AVX2, DEFAULT), reused by later runs and rebuilt by
cpp_extension when the sources or flags change (ninja's depfiles catch an edit of a header). The rows
of ppo_loss's per-token buffer come from kernels/_ppo.py's STATS, passed as -DPPO_STAT_<NAME>=<row>.
Where the build fails (no compiler, no ninja), the "auto" backend warns once and uses the PyTorch
reference; backend="native" raises with the reason.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from fastppo.kernels._ppo import STATS

SOURCES = "*.cpp"  # every C++ source in csrc/, sorted: one per op, plus bindings.cpp


def cache_dir() -> Path:
    root = os.environ.get("FASTPPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastppo")
    return Path(root) / "native"


def source_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fastppo.csrc")  # csrc/ is installed as fastppo.csrc
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastppo's csrc/ sources are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def sources() -> list[Path]:
    """The C++ sources compiled into the module: every csrc/*.cpp, sorted."""
    return sorted(source_dir().glob(SOURCES))


def _flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()  # what ATen itself dispatches to here
    flags = ["-O3", "-fopenmp", "-march=native", f"-DCPU_CAPABILITY={capability}"]
    if capability in ("AVX2", "AVX512"):
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    return flags


def _stat_defines() -> list[str]:
    """-DPPO_STAT_<NAME>=<row> for each row of ppo_loss's per-token buffer, and -DPPO_STAT_COUNT."""
    return [f"-DPPO_STAT_{name}={row}" for row, name in enumerate(STATS)] + [
        f"-DPPO_STAT_COUNT={len(STATS)}"]


@lru_cache(maxsize=None)
def _build():
    """The compiled module, or the exception that stopped the build."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability().lower()
    build = cache_dir() / capability
    build.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=f"fastppo_native_{capability}",
            sources=[str(s) for s in sources()],
            extra_cflags=_flags() + _stat_defines(), extra_ldflags=["-fopenmp"],
            build_directory=str(build), verbose=os.environ.get("FASTPPO_VERBOSE_BUILD") == "1")
    except Exception as e:  # compiler or ninja missing, or a failed compile
        return e


def module():
    """The native module; raises RuntimeError naming the reason when it cannot be built."""
    built = _build()
    if isinstance(built, Exception):
        raise RuntimeError(f"fastppo native CPU kernels could not be built in {cache_dir()}: "
                           f"{type(built).__name__}: {built}") from built
    return built


_warned = False


def available() -> bool:
    """True when the native module builds; the first failure warns once (for backend="auto")."""
    global _warned
    built = _build()
    if isinstance(built, Exception):
        if not _warned:
            warnings.warn(f"fastppo: native CPU kernels unavailable ({type(built).__name__}: "
                          f"{str(built)[:300]}); using the PyTorch reference instead", RuntimeWarning,
                          stacklevel=3)
            _warned = True
        return False
    return True
