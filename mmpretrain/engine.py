"""The only caller of ``deepspeed.initialize``: our optimizer and engine config -> a DeepSpeed engine.

AdamW is ``torch.optim.AdamW`` (fused on CUDA): DeepSpeed's CPU Adam would cost a minute of
compilation on every fresh CPU machine. Biases, norms, embeddings, the logit scale and bias get
no weight decay. The LR schedule is linear warmup then cosine, stepped by the engine.
DeepSpeed's own gradient accumulation stays at 1: ``train.accum_steps`` is GradCache, which keeps
every negative (see ``mmpretrain.loss``).
"""

from __future__ import annotations

import math

import torch

import mmpretrain.distributed  # noqa: F401  (sets DS_ACCELERATOR before deepspeed is imported)
from mmpretrain.engine_config import EngineConfig, OptimConfig


def set_cpu_threads(cfg: EngineConfig, *, ranks_on_node: int, data_workers: int) -> int:
    """Set torch's intra-op threads for a CPU run; returns the number (unchanged on CUDA)."""
    import os

    if torch.cuda.is_available():
        return torch.get_num_threads()
    n = cfg.cpu_threads or max(1, (os.cpu_count() or 1) // ranks_on_node - data_workers)
    torch.set_num_threads(n)
    return n


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of optim.lr at a given step: linear warmup, then cosine (or constant) to min_lr."""
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def deepspeed_config(
    engine: EngineConfig, optim: OptimConfig, micro_batch_size: int, load_universal: bool = False
) -> dict:
    zero = {"stage": engine.zero_stage}
    if engine.zero_stage == 3:
        # Small test models would otherwise keep every parameter whole; keep sharding real.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        # ZeRO 0 with fp32 weights: TrainStep clips (torch.nn.utils.clip_grad_norm_, which also gives the norm it logs)
        "gradient_clipping": 0.0 if owns_clipping(engine) else optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16", "initial_scale_power": 16},
        # amp_bf16: fp32 weights and optimizer, forward under torch.autocast(bfloat16) inside engine.forward
        "torch_autocast": {"enabled": engine.precision == "amp_bf16", "dtype": "bfloat16"},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def build_engine(
    model: torch.nn.Module,
    optim: OptimConfig,
    engine: EngineConfig,
    *,
    micro_batch_size,
    total_steps,
    load_universal: bool = False,
):
    """Wrap the model: returns the DeepSpeed engine (optimizer and LR scheduler inside it)."""
    import deepspeed

    from mmpretrain.model import compile_blocks, param_groups

    if compile_enabled(engine, torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        compile_blocks(model)  # before DeepSpeed wraps the model; state_dict keys do not change
    groups = param_groups(model, optim.weight_decay)
    # fused: one kernel for all parameters, on CPU too (5x faster than the default there, measured in bench_train)
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps))
    ds_engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        config=deepspeed_config(engine, optim, micro_batch_size, load_universal),
        dist_init_required=False,
    )
    if engine.zero_stage == 0 and ds_engine.world_size == 1:
        ds_engine.enable_backward_allreduce = False  # nothing to average over one rank (saves a pass over grads)
    return ds_engine


def owns_clipping(engine: EngineConfig) -> bool:
    """Whether mmpretrain.step.TrainStep clips gradients itself (ZeRO 0 with fp32 weights: whole, averaged torch
    gradients) instead of DeepSpeed; it then also takes the norm on the device and skips the gradient hooks."""
    return engine.zero_stage == 0 and engine.precision in ("fp32", "amp_bf16")


def compile_enabled(engine: EngineConfig, device: torch.device) -> bool:
    """Whether engine.compile asks for compiled blocks on this device (see EngineConfig.compile)."""
    if engine.compile == "auto":
        return device.type == "cuda" and engine.zero_stage < 3
    return engine.compile == "true"


def input_dtype(engine: EngineConfig) -> torch.dtype:
    """The dtype the model's inputs (normalized images) are given in: the weights' dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "amp_bf16": torch.float32}[
        engine.precision
    ]
