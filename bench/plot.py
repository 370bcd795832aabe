"""Plot time and memory of the op benchmarks against token count and vocabulary size.

    python bench/plot.py [--csv bench/results/ops.csv] [--op token_logprobs] [--mode fwd+bwd]
        [--device "x86_64 cpu x2 threads"]
Writes bench/results/<op>-<mode>.png: median time (top) and peak memory (bottom) against the number
of rows at the most measured vocabulary (left), and against the vocabulary at the most measured row
count (right), one line per provider (for gae: rows B and sequence length T). Each (provider, shape) point is its newest row in the CSV for
that device (the title names the revisions the points come from).
"""
from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def newest_points(rows):
    """(provider, N, V) -> newest row; rows are appended in time order."""
    points = {}
    for r in rows:
        n, v = map(int, r["shape"].split("x"))
        points[r["provider"], n, v] = r
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(Path(__file__).with_name("results") / "ops.csv"))
    parser.add_argument("--op", default="token_logprobs")
    parser.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    parser.add_argument("--device", help="device column to plot (default: the newest row's)")
    args = parser.parse_args(argv)
    rows = [r for r in csv.DictReader(open(args.csv)) if r["op"] == args.op and r["mode"] == args.mode]
    if not rows:
        raise SystemExit(f"no rows for op={args.op} mode={args.mode} in {args.csv}")
    device = args.device or rows[-1]["device"]
    rows = [r for r in rows if r["device"] == device]
    if not rows:
        raise SystemExit(f"no rows for device {device!r} in {args.csv}")
    points = newest_points(rows)
    v_fixed = Counter(v for _, _, v in points).most_common(1)[0][0]
    n_fixed = Counter(n for _, n, _ in points).most_common(1)[0][0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    if args.op == "gae":
        rows_name, vocab_name, v_note, n_note = "rows B", "length T", f"T = {v_fixed}", f"B = {n_fixed}"
    else:
        rows_name, vocab_name = "rows (tokens)", "vocabulary"
        v_note, n_note = f"vocabulary {v_fixed}", f"{n_fixed} rows"
    panels = [(0, rows_name, lambda n, v: v == v_fixed, lambda n, v: n, v_note),
              (1, vocab_name, lambda n, v: n == n_fixed, lambda n, v: v, n_note)]
    for col, xlabel, keep, x_of, fixed in panels:
        series = defaultdict(list)
        for (provider, n, v), r in points.items():
            if keep(n, v):
                series[provider].append((x_of(n, v), float(r["median_ms"]),
                                         float(r["peak_mib"] or "nan")))
        for provider, pts in sorted(series.items()):
            pts.sort()
            for row, k in ((0, 1), (1, 2)):
                axes[row][col].plot([p[0] for p in pts], [p[k] for p in pts], "o-", label=provider)
        xs = sorted({p[0] for pts in series.values() for p in pts})
        for row, ylabel in ((0, "median ms"), (1, "peak memory MiB")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])  # the measured sizes, not decades
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_xlabel(f"{xlabel} ({fixed})")
            ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    revs = sorted({r["rev"] for r in points.values()})
    fig.suptitle(f"{args.op} {args.mode}, {rows[0]['dtype']} - {device} - revisions {', '.join(revs)}")
    fig.tight_layout()
    out = Path(args.csv).with_name(f"{args.op}-{args.mode.replace('+', '_')}.png")
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
