"""Measure what mmpretrain.plan predicts: the peak of torch's CPU allocator over a few train steps (the profiler's
memory events, from the model's build on) and, on more than one rank, the bytes of every collective kind per step.

    python tools/bench_plan.py --model ViT-B-16 --batch 16                       # one process, ZeRO 0, fp32
    python tools/bench_plan.py --model ViT-B-16 --batch 16 --grad-ckpt
    torchrun --nproc_per_node=2 tools/bench_plan.py --model tiny --batch 8 --zero-stage 3

Prints predicted vs measured (rank 0). The steps are the trainer's (mmpretrain.step.TrainStep through the engine of
mmpretrain.engine.build_engine) on random in-memory batches. tests/distributed/test_plan.py runs the same check on
the tiny model for ZeRO 0-3; docs/benchmarks.md has the ViT-B-16 rows.
"""

import argparse
import contextlib
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mmpretrain.measure import CollectiveCounter, peak_allocated  # noqa: E402

COUNTER = CollectiveCounter().install()  # before DeepSpeed is imported: its backend keeps these functions

from mmpretrain.config import load_config  # noqa: E402
from mmpretrain.distributed import destroy, init_distributed  # noqa: E402
from mmpretrain.engine import build_engine, release_engine  # noqa: E402
from mmpretrain.model import build_model  # noqa: E402
from mmpretrain.objectives import Objective  # noqa: E402
from mmpretrain.plan import GIB, collectives, count_params, memory, op_totals  # noqa: E402
from mmpretrain.step import TrainStep  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--steps", type=int, default=2, help="train steps (the last one's collectives are counted)")
    args = ap.parse_args(argv)
    info = init_distributed()
    cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}", "optim.warmup_steps=1",
                             "data.synthetic.root=unused", f"engine.zero_stage={args.zero_stage}",
                             f"engine.precision={args.precision}", f"model.grad_checkpointing={args.grad_ckpt}",
                             "engine.compile=false"])  # fmt: skip
    per_rank = args.batch // info.world_size
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        engine = build_engine(build_model(cfg.model), cfg.optim, cfg.engine, micro_batch_size=per_rank,
                              total_steps=args.steps + 1)  # fmt: skip
        step = TrainStep(engine, Objective(cfg), cfg.engine, grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss,
                         device=info.device)  # fmt: skip
        size, ctx, vocab = cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size
        for i in range(args.steps):
            tokens = torch.randint(1, vocab - 2, (per_rank, ctx))
            tokens[:, -1] = vocab - 1
            with COUNTER.counting() if i == args.steps - 1 else contextlib.nullcontext():
                step({"image": torch.randn(per_rank, 3, size, size), "text": tokens}, i + 1)
    measured = peak_allocated(prof)
    params = count_params(cfg.model)
    parts, predicted = memory(params, cfg.model, world=info.world_size, stage=args.zero_stage,
                              precision=args.precision, micro_batch=per_rank, global_batch=args.batch,
                              grad_ckpt=args.grad_ckpt)  # fmt: skip
    if info.rank == 0:
        print(f"{args.model} batch {args.batch} on {info.world_size} rank(s), ZeRO {args.zero_stage}, {args.precision}"
              f", checkpointing {'on' if args.grad_ckpt else 'off'}; {args.steps} steps in "
              f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        for name, n in parts.items():
            print(f"  predicted {name:32s} {n / GIB:8.3f} GiB")
        print(f"peak memory per rank: predicted {predicted / GIB:.3f} GiB, measured {measured / GIB:.3f} GiB "
              f"({(predicted - measured) / measured * 100:+.1f}%)")  # fmt: skip
        if info.world_size > 1:
            want = op_totals(collectives(params, world=info.world_size, stage=args.zero_stage,
                                         precision=args.precision, global_batch=args.batch,
                                         embed_dim=cfg.model.embed_dim, family=cfg.model.family))  # fmt: skip
            for op in sorted(set(want) | set(COUNTER.counted)):
                print(f"  {op:15s} predicted {want.get(op, 0):>14,d} B  counted {COUNTER.counted.get(op, 0):>14,d} B")
    release_engine(engine)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
