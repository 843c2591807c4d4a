"""Worker for test_plan.py: under each ZeRO stage in turn (one launch), three train steps of the tiny model with
every torch.distributed collective counted (bytes of the buffer each call sees, as mmpretrain.plan counts them)
and the peak of torch's CPU allocator (the profiler's running total) from the model's build to the last step.

    torchrun --nproc_per_node=2 tests/distributed/plan_worker.py OUT.json 0:8 1:8 2:8 3:8 0:512 3:8:amp_bf16

Each argument is STAGE:GLOBAL_BATCH[:PRECISION] (fp32 by default; a large batch makes the activations most of the
peak).
"""

import contextlib
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from mmpretrain.measure import CollectiveCounter, peak_allocated

COUNTER = CollectiveCounter().install()  # before DeepSpeed is imported: its TorchBackend keeps these functions

from mmpretrain.config import load_config  # noqa: E402
from mmpretrain.distributed import init_distributed  # noqa: E402
from mmpretrain.engine import build_engine, release_engine  # noqa: E402
from mmpretrain.model import build_model  # noqa: E402
from mmpretrain.objectives import Objective  # noqa: E402
from mmpretrain.step import TrainStep  # noqa: E402


def run_stage(run: str, info) -> dict:
    stage, global_batch, precision = (run.split(":") + ["fp32"])[:3]
    cfg = load_config(None, ["model.name=tiny", f"train.batch_size={global_batch}", "optim.warmup_steps=1",
                             "data.synthetic.root=unused", f"engine.zero_stage={stage}",
                             f"engine.precision={precision}"])  # fmt: skip
    per_rank = int(global_batch) // info.world_size
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        engine = build_engine(build_model(cfg.model), cfg.optim, cfg.engine, micro_batch_size=per_rank, total_steps=4)
        step = TrainStep(engine, Objective(cfg), cfg.engine, grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss,
                         device=info.device)  # fmt: skip
        size, ctx, vocab = cfg.model.vision.image_size, cfg.model.text.context_length, cfg.model.text.vocab_size
        for i in range(3):  # the last step is steady state (ZeRO-3 traces its fetch order in the first)
            g = torch.Generator().manual_seed(100 + i + info.rank)
            tokens = torch.randint(1, vocab - 2, (per_rank, ctx), generator=g)
            tokens[:, -1] = vocab - 1
            with COUNTER.counting() if i == 2 else contextlib.nullcontext():
                res = step({"image": torch.randn(per_rank, 3, size, size, generator=g), "text": tokens}, i + 1)
            assert not res.skipped
        release_engine(engine)
        del engine, step
    return {"collectives": dict(COUNTER.counted), "peak_bytes": peak_allocated(prof)}


def main(out_path, runs):
    info = init_distributed()
    results = {run: run_stage(run, info) for run in runs}
    # Each rank's peak, and the lower one as the run's: on 2 gloo ranks one rank's peak sometimes (about 1 run in 5
    # here, and once on CI) holds one more flat fp32 gradient buffer at DeepSpeed's ZeRO-0 all-reduce (64.6 vs
    # 77.6 MiB for 0:8:amp_bf16); the other rank's does not.
    for run in runs:
        peaks = [None] * info.world_size
        dist.all_gather_object(peaks, results[run]["peak_bytes"])
        results[run]["peak_bytes_ranks"] = peaks
        results[run]["peak_bytes"] = min(peaks)
    if info.rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world_size": info.world_size, "runs": results}, f)
    dist.barrier()
    # Leave without C++ static destructors: once on CI (1 launch in many; never in 3 launches here) a rank aborted
    # after all its work with "terminate called without an active exception" (a joinable std::thread destroyed at
    # exit, after the profiler's last stop), and torchrun failed the launch although measured.json was complete.
    # Everything this worker produces is written and both ranks are past the barrier; nothing is left to tear down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
