"""Shared by the benchmark scripts: timing (median and 20/80 quantiles, warm-up excluded; CUDA events
on a GPU), peak memory, the machine's copy bandwidth, the run's labels (date, revision, device), the
CSV every result is appended to, and what the op benchmarks (bench/op_*.py) have in common: their
Case and the random logits that token_logprobs and ppo_loss read."""
from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

RESULTS = Path(__file__).with_name("results")


def device_name(device: str) -> str:
    """The GPU's name; on CPU the model (from /proc/cpuinfo), its bf16 matmul extensions and the
    threads torch uses, e.g. "Intel(R) Xeon(R) Processor (avx512_bf16) x2 threads"."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux
        pass
    isa = ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags)
    return f"{model}{f' ({isa})' if isa else ''} x{torch.get_num_threads()} threads"


def allocator_env() -> str:
    """The environment variables that change the C allocator (and so speed and peak RSS), if set."""
    return " ".join(f"{k}={os.environ[k]}" for k in ("GLIBC_TUNABLES", "LD_PRELOAD")
                    if os.environ.get(k))


def git_revision() -> str:
    """Short HEAD, with "-dirty" when tracked files (results aside) differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":!/bench/results")
    return rev + "-dirty" if dirty else rev


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, *, repeat: int, warmup: int = 2, setup=None) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn() over `repeat` runs after `warmup` untimed ones. setup()
    runs untimed before each call; its result, unless None, is fn's argument (fn(setup()))."""
    for _ in range(warmup):
        state = setup() if setup else None
        fn() if state is None else fn(state)
    times = []
    for _ in range(repeat):
        state = setup() if setup else None
        sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn() if state is None else fn(state)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn() if state is None else fn(state)
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def matmul_gflops(device: str, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """The box's matmul peak: GFLOP/s of an n x n x n matmul in dtype (median of 7)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    ms, _, _ = time_ms(lambda: a @ b, device, repeat=7)
    return 2 * n**3 / (ms / 1e3) / 1e9


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def peak_mib(fn, device: str, *, setup=None, exclude_bytes: int = 0) -> float:
    """Peak memory fn() adds above what is allocated when it starts, less `exclude_bytes` (what fn is
    meant to allocate and keep, e.g. the gradient buffer it returns), never below 0. CUDA: the
    allocator's peak; CPU: RSS via /proc/self/clear_refs (Linux). setup() runs first, outside the
    window, and as in time_ms its result, unless None, is fn's argument."""
    state = setup() if setup else None
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn() if state is None else fn(state)
        sync(device)
        added = torch.cuda.max_memory_allocated() - base
    else:
        release_free_memory()
        base = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        fn() if state is None else fn(state)
        added = (_rss_kib("VmHWM") - base) * 1024
    return max(0.0, (added - exclude_bytes) / 2**20)


def release_free_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc malloc_trim), so that what fn() allocates
    shows up as RSS growth instead of silently reusing pages freed by an earlier run."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement may read low
        pass


def copy_bandwidth_gbps(device: str, mib: int = 512) -> float:
    """Bytes read + written per second by y.copy_(x) of `mib` MiB: the roofline's denominator."""
    x = torch.randn(mib * 2**18, device=device)
    y = torch.empty_like(x)
    ms, _, _ = time_ms(lambda: y.copy_(x), device, repeat=7)
    return 2 * x.numel() * 4 / (ms / 1e3) / 1e9


def append_csv(name: str, rows: list[dict]) -> Path:
    """Append to bench/results/<name>, or to `name` itself when it is a path with a folder. A row with
    a column the file lacks rewrites the file (write aside, then rename) with the union of the columns;
    old rows leave the new ones blank. A file whose rows do not fit its header is refused, not rewritten."""
    path = Path(name) if Path(name).parent != Path(".") else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fields, old = [], []
    if path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields, old = list(reader.fieldnames or []), list(reader)
        for i, row in enumerate(old, start=2):
            if None in row or None in row.values():
                raise ValueError(f"{path}:{i}: the row does not have the header's "
                                 f"{len(fields)} columns; fix the file before appending")
    new_fields = [k for row in rows for k in row if k not in fields]
    if not new_fields:
        with path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields).writerows(rows)
        return path
    fields += list(dict.fromkeys(new_fields))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old + rows)
    tmp.replace(path)
    return path


def today() -> str:
    return datetime.date.today().isoformat()


# ------------------------------------------------------------------ the op benchmarks (op_*.py)


class Case(NamedTuple):
    """One shape of an op benchmark, as an op_*.py module's cases(op, args) yields it."""
    shape: str                     # the CSV's shape column, e.g. "4096x32000"
    floors: dict                   # mode ("fwd", "bwd", "fwd+bwd") -> bytes the op must move
    inputs: Callable[[], tuple]    # fresh inputs of run(*inputs); its tensors that require grad are
                                   # the ones differentiated (made once per provider)
    repeat: int | None = None      # runs to time, when not --repeat


def logit_shapes(op: str, args):
    """Yields (N, V) for each of --rows x --vocab whose logits fit in --max-logit-bytes; the others
    are skipped with a note."""
    b = torch.finfo(getattr(torch, args.dtype)).bits // 8
    for N in args.rows:
        for V in args.vocab:
            if N * V * b > args.max_logit_bytes:
                print(f"  {op}: N={N} V={V} skipped (logits exceed --max-logit-bytes)")
            else:
                yield N, V


def random_logits(N: int, V: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) of --dtype on --device, 2 * standard normal, and labels uniform in [0, V): the
    same for every op and provider (seed 0)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(device=args.device, dtype=getattr(torch, args.dtype))
    return logits, torch.randint(0, V, (N,), generator=g).to(args.device)
