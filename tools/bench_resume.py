"""The cost of a restart at step 50 and at step 1000 of the same run: samples read and time to the first batch.

    python tools/bench_resume.py                          # restarts at 50 and 1000, 5 repetitions each
    python tools/bench_resume.py --at 50 1000 --reps 7 --workdir /tmp/bench_resume

One tiny run (model tiny, 32 px synthetic shapes, --shards shards of --per-shard samples, global batch --batch,
shuffle buffer --buffer, data.num_streams chosen as a run chooses it, data.num_workers=0: the loader runs in the
training process) trains max(--at) + 1 steps on one process, saving a checkpoint every 50 steps (all kept). Then each
restart step N gets a run folder of its own, as a kill just after step N leaves it: config.yaml, metrics.jsonl up to
step N, checkpoints/step_N and `latest`; and ``python -m mmpretrain.train`` is launched on it, --reps times, the
restart steps interleaved (the order alternates between repetitions). The launched process counts the samples its
loader reads from the tars (mmpretrain.data.streams.read_tar_samples) and stops at the first resumed batch.
Reported, medians over the repetitions (min-max after them):

  samples read    before the first resumed batch (the shuffle buffers read back, then the batch's refills)
  loader s        wall seconds from the loader's creation to its first batch (the seek and the batch)
  loader CPU s    CPU seconds of the process in that interval (what the loader did, undiluted by other processes)
  launch s        wall seconds from the launch of the process to the first batch (imports, engine, checkpoint load)
  launch CPU s    CPU seconds of the process from its start to the first batch

Samples read are the streams' buffers as saved (shuffle_buffer - 1 each) and the batch's refills; fewer where a
stream is near the end of its epoch (its buffer drains there: no next shard refills it within the epoch). The
defaults put both restarts mid-epoch (a stream's epoch: 300 samples, 1 a step).

The first batch's sample keys are checked against the uninterrupted run's step N+1 (logging.sample_keys).
Numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": REPO}  # fmt: skip
CONFIG = """\
output_dir: unused
model: {{name: tiny}}
data:
  num_workers: 0
  train: {{urls: "{urls}", shuffle_buffer: {buffer}}}
train: {{batch_size: {batch}, steps: {steps}, seed: 0}}
optim: {{lr: 1.0e-3, warmup_steps: 10, weight_decay: 0.1}}
engine: {{zero_stage: 0, precision: fp32}}
checkpoint: {{every_steps: 50, keep_last: {keep}}}
eval: {{every_steps: 0}}
logging: {{wandb: disabled, log_every: 10, progress: false}}
"""


def child(result: str, config: str, overrides: list[str]) -> None:
    """In the launched trainer: count the tar samples read, time the loader, stop at its first batch."""
    import mmpretrain.data.streams as streams
    import mmpretrain.loop as loop

    reads = [0]
    real_read, real_loader = streams.read_tar_samples, loop.train_loader

    def counting(*a, **kw):
        for sample in real_read(*a, **kw):
            reads[0] += 1
            yield sample

    class FirstBatch:
        def __init__(self, *a, **kw):
            self.t0, self.c0, self.reads0 = time.time(), time.process_time(), reads[0]
            self.loader = real_loader(*a, **kw)

        def __iter__(self):
            batch = next(iter(self.loader))
            out = {"reads": reads[0] - self.reads0, "reads_before_loader": self.reads0, "at": time.time(),
                   "loader_s": time.time() - self.t0, "loader_cpu_s": time.process_time() - self.c0,
                   "launch_cpu_s": time.process_time(), "keys": batch["keys"]}  # fmt: skip
            with open(result, "w") as f:
                json.dump(out, f)
            os._exit(0)  # the measurement is done: no step, no save

    streams.read_tar_samples = counting
    loop.train_loader = FirstBatch
    sys.exit(loop.run(config, overrides))


def keys_at(folder: str, step: int) -> list[str]:
    for line in open(os.path.join(folder, "sample_keys_rank0.jsonl")):
        rec = json.loads(line)
        if rec["step"] == step:
            return rec["keys"]
    raise KeyError(step)


def restart_folder(run: str, step: int, dest: str) -> None:
    """The run folder as a kill just after ``step`` leaves it (no later checkpoint, no later metrics)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.join(dest, "checkpoints"))
    with open(os.path.join(run, "config.yaml")) as src, open(os.path.join(dest, "config.yaml"), "w") as dst:
        dst.writelines(f"output_dir: {dest}\n" if line.startswith("output_dir:") else line for line in src)
    with open(os.path.join(run, "metrics.jsonl")) as src, open(os.path.join(dest, "metrics.jsonl"), "w") as dst:
        dst.writelines(line for line in src if json.loads(line).get("step", 0) <= step)
    shutil.copytree(os.path.join(run, "checkpoints", f"step_{step}"), os.path.join(dest, "checkpoints", f"step_{step}"))
    with open(os.path.join(dest, "checkpoints", "latest"), "w") as f:
        f.write(f"step_{step}\n")


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import torch

    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="shards and runs (default: a temp dir, removed at exit)")
    p.add_argument("--at", type=int, nargs="+", default=[50, 1000], help="restart steps (multiples of 50)")
    p.add_argument("--reps", type=int, default=7, help="launches per restart step")
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--buffer", type=int, default=64, help="data.train.shuffle_buffer")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=300, help="samples per shard")
    args = p.parse_args(argv)
    if any(step % 50 or step < 50 for step in args.at):
        p.error("--at: multiples of 50 (the run saves every 50 steps)")
    steps = max(args.at) + 1  # every restart has a next batch to compare
    from mmpretrain.data.synthetic import write_shapes_dataset

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = args.workdir or tmp.name
    paths = write_shapes_dataset(os.path.join(work, "shapes"), num_train=args.shards * args.per_shard,
                                 samples_per_shard=args.per_shard, num_eval=16, image_size=32, seed=0)  # fmt: skip
    config = os.path.join(work, "run.yaml")
    with open(config, "w") as f:
        f.write(CONFIG.format(urls=paths.train_urls, buffer=args.buffer, batch=args.batch, steps=steps,
                              keep=steps // 50 + 1))  # fmt: skip
    run = os.path.join(work, "run")
    if not os.path.exists(os.path.join(run, "checkpoints", f"step_{steps}")):
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "mmpretrain.train", config, f"output_dir={run}", "logging.sample_keys=true"]
        proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        print(f"the run: {steps} steps in {time.perf_counter() - t0:.0f} s")
    meta = json.load(open(os.path.join(run, "checkpoints", f"step_{args.at[0]}", "meta.json")))
    position = meta.get("data") or {}
    num_streams = position.get("num_streams")

    results: dict = {step: [] for step in args.at}
    for rep in range(args.reps):
        for step in args.at if rep % 2 == 0 else args.at[::-1]:
            dest = os.path.join(work, f"restart_{step}")
            restart_folder(run, step, dest)
            out = os.path.join(work, "result.json")
            if os.path.exists(out):
                os.remove(out)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", out, config, f"output_dir={dest}"]
            t0 = time.time()
            proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
            if proc.returncode or not os.path.exists(out):
                sys.exit(f"restart at {step} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            res = json.load(open(out))
            assert res["keys"] == keys_at(run, step + 1), f"restart at {step}: not the run's batch {step + 1}"
            res["launch_s"] = res["at"] - t0
            results[step].append(res)

    def cell(step, name, fmt):
        values = [r[name] for r in results[step]]
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    print(f"\n{machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, 1-min load "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"tiny model, global batch {args.batch}, {num_streams} streams x shuffle buffer {args.buffer}, "
          f"{args.shards} shards x {args.per_shard} samples, 1 process, data.num_workers=0; medians of {args.reps} "
          "launches (min-max); the first batch equals the run's next batch in every launch\n")  # fmt: skip
    print("| restart at step | samples read | loader s | loader CPU s | launch s | launch CPU s |\n"
          "|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for step in args.at:
        print(f"| {step} | {cell(step, 'reads', '{:.0f}')} | {cell(step, 'loader_s', '{:.3f}')} | "
              f"{cell(step, 'loader_cpu_s', '{:.3f}')} | {cell(step, 'launch_s', '{:.2f}')} | "
              f"{cell(step, 'launch_cpu_s', '{:.2f}')} |")  # fmt: skip
    if len(args.at) == 2:
        a, b = args.at
        for name in ("reads", "loader_s", "loader_cpu_s", "launch_s", "launch_cpu_s"):
            ratio = statistics.median(r[name] for r in results[b]) / statistics.median(r[name] for r in results[a])
            print(f"{name}: step {b} / step {a} = {ratio:.2f}")
    print(f"\ncommand: python {' '.join([os.path.relpath(__file__)] + argv)}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
