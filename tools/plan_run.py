"""Plan a run before launching it: memory per GPU, bytes per step of every collective, a predicted step time, and the
ZeRO stage, micro-batch and accumulation that fit (the model is in mmpretrain/plan.py; docs/plan.md shows a plan).

    python tools/plan_run.py --model ViT-L-14 --global-batch 32768 --gpus 512 --gpu-mem-gib 80
    python tools/plan_run.py --model ViT-B-16 --global-batch 4096 --gpus 16 --zero-stage 3 --precision bf16
    python tools/plan_run.py --model ViT-L-14 --global-batch 32768 --gpus 512 --gpu-mem-gib 80 --recommend

The step time is compute (the per-GPU samples at a measured rate: --rate, default the H200 numbers of
docs/benchmarks.md, scaled by FLOPs for other sizes; a rate of compiled blocks, x 0.68 under ZeRO 3, which runs them
eager) plus communication (ring wire bytes over --bandwidth-gbs per GPU), without overlap: an upper bound.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mmpretrain.engine_config import PRECISIONS  # noqa: E402
from mmpretrain.model.sizes import SIZES  # noqa: E402
from mmpretrain.plan import format_plan, format_recommendation, plan, recommend  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", choices=sorted(SIZES), help="size name (model.name)")
    ap.add_argument("--global-batch", type=int, required=True, help="samples per optimizer step, all GPUs")
    ap.add_argument("--gpus", type=int, required=True, help="data-parallel ranks (nodes x GPUs per node)")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    ap.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    ap.add_argument("--precision", default="amp_bf16", choices=PRECISIONS)
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (model.grad_checkpointing)")
    ap.add_argument("--micro-batch", type=int, default=None, help="per-GPU micro-batch (default: the whole share)")
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="measured samples/s per GPU at this model/precision, compiled blocks (ZeRO 0-2)",
    )
    ap.add_argument("--bandwidth-gbs", type=float, default=50.0,
                    help="interconnect GB/s per GPU (default 50: 400 Gb/s InfiniBand per GPU)")  # fmt: skip
    ap.add_argument("--recommend", action="store_true", help="list every stage / checkpointing / micro-batch that fits")
    args = ap.parse_args(argv)
    try:
        p = plan(args.model, global_batch=args.global_batch, gpus=args.gpus, zero_stage=args.zero_stage,
                 precision=args.precision, grad_ckpt=args.grad_ckpt, micro_batch=args.micro_batch, rate=args.rate,
                 bandwidth_gbs=args.bandwidth_gbs)  # fmt: skip
    except ValueError as e:
        ap.error(str(e))
    print(format_plan(p, args.gpu_mem_gib))
    if args.recommend:
        fits = recommend(args.model, global_batch=args.global_batch, gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib,
                         precision=args.precision, bandwidth_gbs=args.bandwidth_gbs, rate=args.rate)  # fmt: skip
        print(format_recommendation(fits, args.gpu_mem_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
