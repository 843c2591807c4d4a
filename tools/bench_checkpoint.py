"""The stall of a checkpoint save: synchronous (checkpoint.async_save=false: write and fsync, then train on) vs
background (checkpoint.async_save=true: train on while a thread copies the state to host memory and writes it).

    python tools/bench_checkpoint.py --model ViT-B-16 --rounds 3
    python tools/bench_checkpoint.py --model tiny --rounds 3 --dir /tmp/ckpt-bench

One process, ZeRO 0, fp32: the engine of mmpretrain.engine.build_engine after one train step (so AdamW's moments
exist), saved with mmpretrain.checkpoint.save as the train loop calls it, each save followed by one train step (batch
2) as in a run, the two modes alternating. Reported per mode: the stall (seconds the training was blocked: in the
save, plus, in the background mode, the next update's wait for the host copy: what checkpoint/stall_s logs), the
duration of the step after the save (the background copy runs beside it: what the overlap costs), and for the
background mode the time until `latest` named the checkpoint. Numbers in docs/benchmarks.md.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mmpretrain import checkpoint  # noqa: E402
from mmpretrain.config import load_config  # noqa: E402
from mmpretrain.distributed import destroy, init_distributed  # noqa: E402
from mmpretrain.engine import build_engine, release_engine  # noqa: E402
from mmpretrain.model import build_model  # noqa: E402
from mmpretrain.objectives import Objective  # noqa: E402
from mmpretrain.step import TrainStep  # noqa: E402


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=2, help="saves per mode (alternating)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    args = ap.parse_args(argv)
    info = init_distributed()
    cfg = load_config(None, [f"model.name={args.model}", "train.batch_size=2", "data.synthetic.root=unused"])
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model), cfg.optim, cfg.engine, micro_batch_size=2, total_steps=10)
    step = TrainStep(engine, Objective(cfg), cfg.engine, grad_clip=1.0, loss_cfg=cfg.loss, device=info.device)
    size, ctx, vocab = cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size
    tokens = torch.randint(1, vocab - 2, (2, ctx))
    tokens[:, -1] = vocab - 1
    batch = {"image": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8), "text": tokens}
    step(batch, 1)

    root = args.dir or tempfile.mkdtemp(prefix="bench-ckpt-")
    stalls: dict = {"sync": [], "background": []}
    steps: dict = {"sync": [], "background": []}
    committed = []
    saver = checkpoint.BackgroundSaver()
    n = 0
    for _ in range(args.rounds):
        for mode in ("sync", "background"):
            n += 1
            t0 = time.perf_counter()
            tag, stall = checkpoint.save(engine, root, n, {"world_size": 1}, 0, keep_last=1,
                                         saver=saver if mode == "background" else None)  # fmt: skip
            step.before_update = saver.wait_staged if mode == "background" else None
            t1 = time.perf_counter()
            step(batch, n + 1)  # the next step, as in a run (the background copy runs beside its forward/backward)
            steps[mode].append(time.perf_counter() - t1)
            if mode == "background":
                stall = saver.pop_stall()[1]  # the save's time + the update's wait for the copy
                saver.wait()  # only to time the write behind it; a run trains on meanwhile
                committed.append(time.perf_counter() - t0)
            stalls[mode].append(stall)
            assert checkpoint.latest_tag(root) == tag
    size = folder_bytes(os.path.join(root, "checkpoints", checkpoint.latest_tag(root)))
    params = sum(p.numel() for p in engine.module.parameters())
    print(f"{args.model} ({params:,} parameters), checkpoint {size / 2**30:.2f} GiB, {args.rounds} saves per mode, "
          f"{root}")  # fmt: skip
    for mode, values in stalls.items():
        print(f"  {mode:11s} stall median {statistics.median(values):7.2f} s  (each: "
              + ", ".join(f"{v:.2f}" for v in values) + f"); the step after it: median "
              f"{statistics.median(steps[mode]):.2f} s")  # fmt: skip
    print(f"  background: committed (latest moved) after a median {statistics.median(committed):.2f} s")
    ratio = statistics.median(stalls["background"]) / statistics.median(stalls["sync"])
    print(f"  background stall / sync stall = {ratio:.3f}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    release_engine(engine)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
