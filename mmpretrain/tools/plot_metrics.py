"""Plot the metrics.jsonl of one or more runs: one subplot per metric, one line per run.

    mmpretrain-plot outputs/demo                          # -> outputs/demo/metrics.png
    mmpretrain-plot outputs/run_a outputs/run_b --out cmp.png --keys loss,lr

The same command as ``python -m mmpretrain.tools.plot_metrics`` or, in a checkout, ``python tools/plot_metrics.py``.
Keys (default): loss, lr, logit_scale, samples_per_s, grad_norm, then every eval metric found
(keys starting with zeroshot/ or retrieval/, less their sample counts), all against `step`.
Training metrics are drawn as lines, eval metrics as points (they are logged every few hundred
steps). A key no run logged is skipped with a note; a line that is not JSON (a run killed
mid-write) is skipped and counted. Writes a PNG with matplotlib's Agg backend (no display
needed). Default output: metrics.png in the first run folder. Exit code 2 with a one-line error
for a missing folder or metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

TRAIN_KEYS = ("loss", "lr", "logit_scale", "samples_per_s", "grad_norm")
EVAL_PREFIXES = ("zeroshot/", "retrieval/")


def read_metrics(run_dir: str) -> tuple[list[dict], int]:
    """(records, number of unreadable lines) of <run_dir>/metrics.jsonl; FileNotFoundError names what is missing."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run's output_dir?)")
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
            else:
                bad += 1
    return records, bad


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that hold a finite number under `key`."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(v)
    return steps, values


def default_keys(runs: dict) -> list[str]:
    """The training keys, then every eval key any run logged (sorted)."""
    eval_keys = {k for records in runs.values() for r in records for k in r if k.startswith(EVAL_PREFIXES)}
    eval_keys = sorted((k for k in eval_keys if "/num_" not in k), key=_numbers_as_numbers)  # sizes are no metrics
    return list(TRAIN_KEYS) + eval_keys


def _numbers_as_numbers(key: str) -> list:
    """Sort key that orders R@5 before R@10 and top5 before top10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def plot(runs: dict, keys: list[str], out: str) -> list[str]:
    """Write the figure; returns the keys that had data (the others are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(series(records, k)[0] for records in runs.values())]
    if not present:
        raise ValueError(f"none of the keys {', '.join(keys)} has a value in any run")
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # a run keeps its color in every subplot
    all_steps = [r["step"] for records in runs.values() for r in records]
    lo, hi = min(all_steps), max(all_steps)
    pad = max(1, (hi - lo) * 0.03)  # eval points at the last step stay visible
    for ax, key in zip(axes.flat, present):
        is_eval = key.startswith(EVAL_PREFIXES)
        for name, records in runs.items():
            steps, values = series(records, key)
            if not steps:
                continue
            style = dict(marker="o", linestyle=":") if is_eval else {}
            ax.plot(steps, values, label=name, color=colors[name], **style)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(present) :]:
        ax.set_visible(False)
    if len(runs) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[name]) for name in runs]
        fig.legend(handles, list(runs), loc="upper center", ncol=min(len(runs), 4), fontsize="small")
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.4 * rows)))  # room for the legend row
    else:
        fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return present


def run_labels(run_dirs: list[str]) -> list[str]:
    """Folder names, or the full paths where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


PROG = "mmpretrain-plot"


def main(argv=None, prog: str = PROG) -> int:
    """The console script ``mmpretrain-plot``: 0 when the PNG is written, 2 (one line on stderr) for a bad argument,
    a missing folder or metrics.jsonl; ``prog`` names the command in usage and error lines."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output folders holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: <first RUN_DIR>/metrics.png)")
    p.add_argument("--keys", default=None, help=f"comma list (default: {','.join(TRAIN_KEYS)} + eval keys found)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = {}
        if len(set(os.path.normpath(d) for d in args.run_dirs)) != len(args.run_dirs):
            raise ValueError("a RUN_DIR is given twice")
        for label, run_dir in zip(run_labels(args.run_dirs), args.run_dirs):
            records, bad = read_metrics(run_dir)
            if bad:
                print(f"{prog}: {run_dir}: skipped {bad} unreadable line(s)", file=sys.stderr)
            runs[label] = records
        keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else default_keys(runs)
        if not keys:
            raise ValueError("--keys is empty")
        out = args.out or os.path.join(args.run_dirs[0], "metrics.png")
        present = plot(runs, keys, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    missing = [k for k in keys if k not in present]
    if missing:
        print(f"{prog}: no values for {', '.join(missing)}; left out", file=sys.stderr)
    print(f"wrote {out} ({len(present)} plots, {len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m mmpretrain.tools.plot_metrics"))
