"""Train every recipe's tiny twin on the demo data and tabulate zero-shot and retrieval side by side.

    python tools/bench_recipes.py                          # every configs/recipes/*-tiny.yaml, full length
    python tools/bench_recipes.py --recipes clip mim --md docs/recipes_table.md
    python tools/bench_recipes.py --recipes itm train.steps=300   # overrides go to every run

Each recipe runs ``python -m mmpretrain.train configs/recipes/<name>-tiny.yaml output_dir=<workdir>/<name>``
one after the other (a finished run folder is reused: delete it to measure again); the table reads each run's
eval.json (the final evaluation on the held-out shapes sets: 32-class zero-shot with the prompt templates,
image<->text retrieval) and the run's loss terms from metrics.jsonl. Keys beyond the standard ones (e.g. ITM
re-ranked retrieval) are listed under the table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES_DIR = os.path.join(REPO, "configs", "recipes")
COLUMNS = [  # (header, eval.json key suffix): zeroshot/<set>/top1 (shapes; eval in runs from before 0.2)
    ("zero-shot top-1", "/top1"),
    ("top-5", "/top5"),
    ("image→text R@1", "image_to_text_R@1"),
    ("R@5", "image_to_text_R@5"),
    ("text→image R@1", "text_to_image_R@1"),
    ("R@5 ", "text_to_image_R@5"),
]


def available() -> list[str]:
    return sorted(
        os.path.basename(p)[: -len("-tiny.yaml")] for p in glob.glob(os.path.join(RECIPES_DIR, "*-tiny.yaml"))
    )


def plain_key(results: dict, suffix: str):
    """The plain (not re-ranked) result whose key ends with suffix."""
    keys = [k for k in results if k.endswith(suffix) and "rerank" not in k]
    return results[keys[0]] if keys else None


def run_recipe(name: str, workdir: str, overrides: list[str]) -> dict:
    out = os.path.join(workdir, name)
    if name == "distill":  # its teacher: the clip twin's run of this bench (main runs clip first)
        overrides = [f"loss.terms.distill.teacher={os.path.join(workdir, 'clip')}", *overrides]
    eval_path = os.path.join(out, "eval.json")
    if not os.path.isfile(eval_path):
        cmd = [sys.executable, "-m", "mmpretrain.train", os.path.join(RECIPES_DIR, f"{name}-tiny.yaml"),
               f"output_dir={out}", "logging.progress=false", *overrides]  # fmt: skip
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "wall_s.txt"), "w") as f:
            f.write(f"{time.time() - t0:.0f}\n")
    results = json.load(open(eval_path))
    wall = os.path.join(out, "wall_s.txt")
    results["wall_s"] = float(open(wall).read()) if os.path.isfile(wall) else None
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [m for m in lines if "loss" in m]
    results["terms"] = {k[len("loss/") :]: train[-1][k] for k in train[-1] if k.startswith("loss/")} if train else {}
    return results


def table(rows: dict) -> str:
    head = "| recipe | terms (final loss) | " + " | ".join(h for h, _ in COLUMNS) + " | wall |"
    lines = [head, "|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, r in rows.items():
        terms = ", ".join(f"{k} {v:.3f}" for k, v in r["terms"].items())
        cells = [plain_key(r, key) for _, key in COLUMNS]
        cells = ["" if c is None else f"{100 * c:.1f}%" for c in cells]
        wall = f"{r['wall_s'] / 60:.1f} min" if r.get("wall_s") else ""
        lines.append(f"| {name} | {terms} | " + " | ".join(cells) + f" | {wall} |")
    extra = []
    for name, r in rows.items():
        for k, v in r.items():
            if "rerank" in k and isinstance(v, float):
                extra.append(f"- {name}: `{k}` = {100 * v:.1f}%")
    return "\n".join(lines + ([""] + extra if extra else []))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.steps=300")
    p.add_argument("--recipes", nargs="+", default=None, help=f"names (default: all of {available()})")
    p.add_argument("--workdir", default=os.path.join(REPO, "outputs", "recipes"), help="run folders go here")
    p.add_argument("--md", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    names = args.recipes or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        p.error(f"--recipes: no configs/recipes/<name>-tiny.yaml for {unknown} (have {available()})")
    if "distill" in names and "clip" not in names:
        names = ["clip", *names]
    names = sorted(names, key=lambda n: n != "clip")  # clip first: the baseline, and distill's teacher
    rows = {name: run_recipe(name, args.workdir, args.overrides) for name in names}
    md = table(rows)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
