"""End to end: our whole training command vs OpenCLIP's own trainer, on the same real JPEG shards, alternating.

    python tools/bench_e2e.py --workdir /work/e2e --rounds 3              # CPU: configs/bench-tiny.yaml, batch 64
    python tools/bench_e2e.py --workdir /work/e2e --ours-extra engine.cpu_threads=2   # a setting's effect
    python tools/bench_train.py --e2e --workdir /work/e2e                 # the same, through bench_train

What is timed is what users run. Ours: `python -m mmpretrain.train configs/bench-tiny.yaml` with the shards,
steps and data workers set and every other setting at its default. OpenCLIP: `open_clip_train.main` (its own
trainer, run in its own virtual environment with the webdataset version it supports, `--openclip-venv`; made
here on first use) with the same model (the custom config tools/bench_train.py builds: the same parameters),
batch, precision (fp32), learning-rate settings and data workers, on the same shards. The runs alternate
(ours, OpenCLIP, ours, ...) so that a change in machine load hits both.

Per run: the whole command's wall time, and the steady samples/s: ours from metrics.jsonl (every log window
after the first, which holds start-up), OpenCLIP from its log (samples between its first progress line past
step 10 and its last, over the seconds between them). Shards: `--images` JPEGs of `--size` (crops, flips and
colour shifts of scikit-image's photos, as tools/gpu_check.py makes), in 8 tars, captions "a photo, number N".
Results: a markdown table on stdout and `--json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)

OPENCLIP_WDS = "webdataset==0.2.86"  # open_clip's requirements-training.txt: webdataset>=0.2.5,<=0.2.86


def make_shards(folder: str, images: int, size: tuple[int, int]) -> str:
    """8 tars of photo-like JPEGs (once per folder); returns their brace pattern."""
    from gpu_check import _photo_shards

    pattern = os.path.join(folder, "{00000..00007}.tar")
    if not os.path.exists(os.path.join(folder, "00007.tar")):
        _photo_shards(folder, images, 8, size, workers=os.cpu_count() or 1)
    return pattern


def openclip_venv(path: str) -> str:
    """A venv on top of this Python's packages with OpenCLIP's webdataset version; returns its python."""
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", path], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", OPENCLIP_WDS, "pandas"], check=True)  # its data.py
    return python


OPENCLIP_RUNNER = """
import json, sys
import open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def model_json(cfg, path: str) -> str:
    from bench_train import openclip_model_cfg

    with open(path, "w") as f:
        json.dump(openclip_model_cfg(cfg.model), f)
    return os.path.splitext(os.path.basename(path))[0]


def run_ours(args, urls: str, out: str, steps: int) -> dict:
    cmd = [sys.executable, "-m", "mmpretrain.train", args.config, f"output_dir={out}", f"data.train.urls={urls}",
           f"train.steps={steps}", f"data.num_workers={args.workers}", "data.synthetic.root=null",
           "logging.wandb=disabled", "logging.progress=false", "checkpoint.every_steps=0", "eval.every_steps=0",
           *args.ours_extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ours failed: {proc.stderr[-2000:]}")
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"samples_per_s"' in x]
    steady = [r["samples_per_s"] for r in lines[1:]] or [r["samples_per_s"] for r in lines]
    return {"wall_s": wall, "samples_per_s": statistics.median(steady),
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in lines[1:] or lines)}  # fmt: skip


PROGRESS = re.compile(r"^(\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d).*Train Epoch: \d+ \[\s*(\d+)/")


def run_openclip(args, python: str, urls: str, out: str, model_cfg_path: str, name: str, steps: int) -> dict:
    cfg = args.cfg
    o = cfg.optim
    samples = steps * cfg.train.batch_size
    cmd = [python, "-c", OPENCLIP_RUNNER, model_cfg_path, "--train-data", urls, "--dataset-type", "webdataset",
           "--train-num-samples", str(samples), "--batch-size", str(cfg.train.batch_size), "--epochs", "1",
           "--workers", str(args.workers), "--precision", "fp32", "--model", name, "--lr", str(o.lr),
           "--wd", str(o.weight_decay), "--beta1", str(o.beta1), "--beta2", str(o.beta2), "--eps", str(o.eps),
           "--warmup", str(o.warmup_steps), "--grad-clip-norm", str(o.grad_clip), "--logs", out, "--name", "run",
           "--log-every-n-steps", "10", "--save-frequency", "0", "--report-to", "", "--device", "cpu",
           "--seed", str(cfg.train.seed)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - t0
    log = os.path.join(out, "run", "out.log")
    if proc.returncode != 0 or not os.path.exists(log):
        raise RuntimeError(f"open_clip_train failed: {proc.stderr[-3000:]}")
    points = []
    for line in open(log):
        m = PROGRESS.search(line)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d,%H:%M:%S").timestamp()
            points.append((t, int(m.group(2))))
    points = [p for p in points if p[1] >= 10 * cfg.train.batch_size] or points
    rate = (points[-1][1] - points[0][1]) / max(1.0, points[-1][0] - points[0][0]) if len(points) > 1 else None
    return {"wall_s": wall, "samples_per_s": rate}


def bench(args) -> dict:
    from mmpretrain.config import load_config

    args.cfg = load_config(args.config)  # its model, batch and optimizer settings
    os.makedirs(args.workdir, exist_ok=True)
    urls = make_shards(os.path.join(args.workdir, "shards"), args.images, tuple(args.size))
    python = openclip_venv(args.openclip_venv or os.path.join(args.workdir, "openclip-venv"))
    cfg_path = os.path.join(args.workdir, "mmpretrain-bench-e2e.json")
    name = model_json(args.cfg, cfg_path)
    results = {"ours": [], "open_clip": []}
    for r in range(args.rounds):
        out = os.path.join(args.workdir, f"ours-{r}")
        subprocess.run(["rm", "-rf", out], check=True)
        results["ours"].append(run_ours(args, urls, out, args.steps))
        out = os.path.join(args.workdir, f"openclip-{r}")
        subprocess.run(["rm", "-rf", out], check=True)
        os.makedirs(out)
        results["open_clip"].append(run_openclip(args, python, urls, out, cfg_path, name, args.steps))
        print(f"round {r + 1}: ours {results['ours'][-1]['samples_per_s']:.1f} samples/s "
              f"({results['ours'][-1]['wall_s']:.1f} s), open_clip {results['open_clip'][-1]['samples_per_s']:.1f} "
              f"({results['open_clip'][-1]['wall_s']:.1f} s)", flush=True)  # fmt: skip
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "samples_per_s")} for k, v in results.items()}
    load = os.getloadavg()
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load[0]:.2f}",
        "config": args.config, "steps": args.steps, "batch": args.cfg.train.batch_size, "workers": args.workers,
        "ours_extra": args.ours_extra, "images": args.images, "size": args.size, "rounds": results, "median": med,
        "ratio_samples_per_s": med["ours"]["samples_per_s"] / med["open_clip"]["samples_per_s"],
        "ratio_wall": med["open_clip"]["wall_s"] / med["ours"]["wall_s"],
    }  # fmt: skip
    print(f"\n| impl | samples/s (median of {args.rounds}) | whole command s |\n|---|---:|---:|")
    for k in ("ours", "open_clip"):
        print(f"| {k} | {med[k]['samples_per_s']:.1f} | {med[k]['wall_s']:.1f} |")
    print(f"\nours / open_clip: samples/s {summary['ratio_samples_per_s']:.2f}x, whole command "
          f"{summary['ratio_wall']:.2f}x ({summary['machine']}; {args.steps} steps of {summary['batch']}, "
          f"{args.workers} data worker(s) each)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/bench_e2e.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="shards, run folders and the OpenCLIP venv go here")
    p.add_argument("--config", default="configs/bench-tiny.yaml", help="our config (its model and batch)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--workers", type=int, default=1, help="data loader workers, both trainers (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--images", type=int, default=8192, help="JPEGs in the shards (default 8192)")
    p.add_argument("--size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"), help="JPEG size")
    p.add_argument("--openclip-venv", default="", help=f"venv for open_clip_train ({OPENCLIP_WDS}); made if missing")
    p.add_argument("--ours-extra", nargs="*", default=[], help="extra overrides for our runs (key=value ...)")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    bench(parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
