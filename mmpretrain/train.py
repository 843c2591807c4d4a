"""Train a CLIP or SigLIP model on WebDataset shards under DeepSpeed.

    python -m mmpretrain.train configs/demo.yaml [key=value ...]
    torchrun --nproc_per_node=2 -m mmpretrain.train configs/demo.yaml engine.zero_stage=3
    mmpretrain-train demo                # installed package, no checkout: the bundled configs/demo.yaml

Restarting the same command resumes from ``<output_dir>/checkpoints/latest``.
``--stop-after-steps N`` ends this invocation after N steps with a checkpoint (for time-sliced
jobs); the next invocation of the same command continues where it stopped.

Exit codes: 0 finished (or --stop-after-steps), 2 bad config, 75 stopped on request (SIGUSR1, SIGTERM, Ctrl-C, a
stop file) with a checkpoint saved (rerun to resume), 130 a second Ctrl-C (no save), 1 any other error. An
unexpected error on one rank ends the others: torchrun stops the remaining workers, and a rank waiting on a dead
peer fails within engine.dist_timeout_s.

This module is the command line only (``--help`` imports nothing heavy); the loop is mmpretrain.loop.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mmpretrain.train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML file, or the name of a bundled config (configs/): demo, recipes/clip-tiny ...")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.name=tiny")
    p.add_argument("--stop-after-steps", type=int, default=0, help="checkpoint and exit after N steps (0 = run on)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # torch, DeepSpeed and the model load here, after the arguments parsed (and --help answered)
    from torch.distributed.elastic.multiprocessing.errors import record

    from mmpretrain.loop import run

    # record: under torchrun, an exception on any rank is written where the launcher reports it as the root cause
    code = record(run)(args.config, args.overrides, args.stop_after_steps)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
