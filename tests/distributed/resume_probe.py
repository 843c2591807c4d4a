"""Load a run's latest checkpoint exactly as ``mmpretrain.train`` resumes it, at this launch's world size.

    [torchrun --nproc_per_node=N] python tests/distributed/resume_probe.py CONFIG OUT.pt [overrides...]

Rank 0 saves ``{param name: (fp32 weight, exp_avg, exp_avg_sq)}`` (whole tensors) and the step, so a test
can compare what 1 rank and 2 ranks hold after loading the same checkpoint.
"""

import sys

import torch

from mmpretrain import checkpoint
from mmpretrain.config import load_config
from mmpretrain.distributed import destroy, env_rank_world, init_distributed
from mmpretrain.engine import build_engine, release_engine
from mmpretrain.model import build_model


def main() -> None:
    config, out, *overrides = sys.argv[1:]
    world = env_rank_world()[1]
    cfg = load_config(config, overrides, world_size=world)
    info = init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tag, universal = checkpoint.prepare_resume(
        cfg.output_dir, world_size=world, zero_stage=cfg.engine.zero_stage, rank=info.rank
    )
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=cfg.train.batch_size // world,
                          total_steps=cfg.train.steps, load_universal=universal)  # fmt: skip
    meta = checkpoint.resume(engine, cfg.output_dir, info.rank, tag=tag)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 link the per-parameter views of the optimizer state at the first step; a probe takes none
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0:
            opt = engine.optimizer.state[p]
            state[name] = (p.detach().float().clone(), opt["exp_avg"].clone(), opt["exp_avg_sq"].clone())
        else:  # collectives: every rank takes part
            state[name] = tuple(
                t.clone()
                for t in (
                    safe_get_full_fp32_param(p),
                    safe_get_full_optimizer_state(p, "exp_avg"),
                    safe_get_full_optimizer_state(p, "exp_avg_sq"),
                )
            )
    if info.rank == 0:
        torch.save({"step": meta["step"], "universal": universal, "state": state}, out)
    release_engine(engine)
    destroy()  # before interpreter exit, as mmpretrain.train does (see zero_equivalence_worker.py)


if __name__ == "__main__":
    main()
