"""Plot time and memory of the op benchmarks against vocabulary size and row count.

    python bench/plot.py [--csv bench/results/ops.csv] [--op token_logprobs] [--mode fwd+bwd]
Writes bench/results/<op>-<mode>.png from the newest date and revision of each device in the CSV.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(Path(__file__).with_name("results") / "ops.csv"))
    parser.add_argument("--op", default="token_logprobs")
    parser.add_argument("--mode", default="fwd+bwd")
    args = parser.parse_args(argv)
    rows = [r for r in csv.DictReader(open(args.csv)) if r["op"] == args.op and r["mode"] == args.mode]
    if not rows:
        raise SystemExit(f"no rows for op={args.op} mode={args.mode} in {args.csv}")
    newest = max((r["date"], r["rev"]) for r in rows)
    rows = [r for r in rows if (r["date"], r["rev"]) == newest]
    series = defaultdict(list)
    for r in rows:
        n, v = map(int, r["shape"].split("x"))
        series[r["provider"]].append((n * v, float(r["median_ms"]), float(r["peak_mib"] or "nan"),
                                      r["shape"]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for provider, points in sorted(series.items()):
        points.sort()
        ax_t.plot([p[0] for p in points], [p[1] for p in points], "o-", label=provider)
        ax_m.plot([p[0] for p in points], [p[2] for p in points], "o-", label=provider)
    for ax, label in ((ax_t, "median ms"), (ax_m, "peak extra MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows x vocabulary (logits)")
        ax.set_ylabel(label)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"{args.op} {args.mode} - {rows[0]['device']} - {newest[0]} {newest[1]}")
    fig.tight_layout()
    out = Path(args.csv).with_name(f"{args.op}-{args.mode.replace('+', '_')}.png")
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
