"""Per-step metrics: one JSON object a line in metrics.jsonl, and a PNG of the main curves."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from fastppo.distributed import is_main


def reset_peak_memory(device) -> float:
    """Start a new peak-memory window (CUDA: the allocator's peak; Linux CPU: the process's peak RSS)
    and return the memory in use now (MiB): peak_memory_mib() minus it is what the window added."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:  # not Linux: peak_memory_mib falls back to the whole run's peak
        pass
    return _proc_status_mib("VmRSS:") or 0.0


def peak_memory_mib(device) -> float:
    """Peak memory since reset_peak_memory: CUDA allocated bytes, or the CPU process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _proc_status_mib("VmHWM:")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _written(path: Path, text: str, *, mode: str = "w") -> None:
    """`text` written into `path` (mode "a": appended). A file system that refuses it (a full disk,
    a quota, the folder gone) stops the run with one line naming the file (fastppo.run.Stopped): its
    last checkpoint stays."""
    try:
        with path.open(mode) as fh:
            fh.write(text)
    except OSError as e:
        from fastppo.run import Stopped

        raise Stopped(f"could not write {path} ({e.strerror or e}); stopping. The last checkpoint "
                      f"in {path.parent / 'checkpoint'} (if any) is complete") from None


class MetricsLog:
    """Appends to `<out>/metrics.jsonl`; a fresh run truncates it, a resumed one keeps the rows of the
    steps it has not redone."""

    def __init__(self, out, *, resume_step: int | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = is_main()  # under torchrun rank 0 writes; rows are global-batch figures
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and self.path.exists():
            rows = [r for r in self.read() if r["step"] < resume_step]
        _written(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        _written(self.path, json.dumps(row) + "\n", mode="a")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot(metrics_path, png_path, keys: list[str], title: str) -> None:
    if not is_main():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points],
                marker="o" if len(points) == 1 else None)  # a lone point (eval_accuracy) shows
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=80)
    except OSError as e:
        from fastppo.run import Stopped

        raise Stopped(f"could not write the plot {png_path} ({e.strerror or e}); the run finished "
                      f"and its checkpoint in {Path(png_path).parent / 'checkpoint'} is complete") \
            from None
    finally:
        plt.close(fig)
