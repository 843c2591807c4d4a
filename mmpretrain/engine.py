"""The only caller of ``deepspeed.initialize``: our optimizer and engine config -> a DeepSpeed engine.

AdamW is ``torch.optim.AdamW`` (fused on CUDA): DeepSpeed's CPU Adam would cost a minute of
compilation on every fresh CPU machine. Biases, norms, embeddings, the logit scale and bias get
no weight decay. The LR schedule is linear warmup then cosine, stepped by the engine.
DeepSpeed's own gradient accumulation stays at 1: ``train.accum_steps`` is GradCache, which keeps
every negative (see ``mmpretrain.loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import mmpretrain.distributed  # noqa: F401  (sets DS_ACCELERATOR before deepspeed is imported)

PRECISIONS = ("fp32", "bf16", "fp16", "amp_bf16")
COMPILE_MODES = ("auto", "true", "false")
_COMPILE_ALIASES = {"on": "true", "off": "false", "yes": "true", "no": "false"}
SCHEDULES = ("cosine", "constant")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate after warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine schedule."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to optim.lr."""
    schedule: str = "cosine"
    """cosine | constant (after warmup)."""
    weight_decay: float = 0.2
    """Decoupled AdamW weight decay (CLIP recipe); not applied to biases, norms, embeddings, logit scale/bias."""
    beta1: float = 0.9
    beta2: float = 0.98
    """AdamW second-moment decay (0.98 as in CLIP: more stable at large batch)."""
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 = no clipping."""

    def validate(self, prefix: str) -> None:
        if self.lr <= 0:
            raise ValueError(f"{prefix}.lr must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"{prefix}.min_lr must be in [0, {prefix}.lr] (got {self.min_lr})")
        if self.warmup_steps < 0:
            raise ValueError(f"{prefix}.warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{prefix}.schedule must be one of {SCHEDULES} (got {self.schedule!r})")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key} must be in [0, 1) (got {getattr(self, key)})")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError(f"{prefix}.weight_decay, {prefix}.eps and {prefix}.grad_clip must be >= 0 (eps > 0)")


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+grads), 3 (+params)."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 | amp_bf16. bf16/fp16: DeepSpeed keeps the weights in that dtype (fp32 master copy in
    the optimizer); amp_bf16: fp32 weights, matmuls under torch.autocast(bfloat16) (DeepSpeed's torch_autocast).
    fp16 needs CUDA. Loss, logit scale and LayerNorms compute in fp32 either way."""
    compile: str = "auto"
    """auto | true | false (on/off too): torch.compile each transformer block of the towers (one compiled graph
    shared by all blocks of a shape, as torchtitan does). auto = on for CUDA with ZeRO 0-2, off on CPU (compiling
    costs more than it saves in the short CPU runs) and under ZeRO-3 (its parameter hooks do not trace)."""
    dist_timeout_s: float = 600.0
    """Process-group timeout in seconds: a dead peer ends the run after this long."""
    cpu_threads: int = 0
    """CPU only: torch intra-op threads per rank. 0 = the cores left per rank after the data workers
    (at least 1); oversubscribed cores make OpenMP spin, which costs more than a thread gains."""

    def validate(self, prefix: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"{prefix}.zero_stage must be 0, 1, 2 or 3 (got {self.zero_stage})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{prefix}.precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError(f"{prefix}.precision=fp16 needs a CUDA device; use fp32 or bf16 here")
        mode = str(self.compile).lower()  # YAML reads a bare on/true as a bool, which the str field stores as "True"
        self.compile = _COMPILE_ALIASES.get(mode, mode)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"{prefix}.compile must be one of {COMPILE_MODES} (got {self.compile!r})")
        if self.compile == "true" and self.zero_stage == 3:
            raise ValueError(f"{prefix}.compile=true does not work with {prefix}.zero_stage=3 (ZeRO-3's parameter "
                             "hooks do not trace); use auto or off")  # fmt: skip
        if self.cpu_threads < 0:
            raise ValueError(f"{prefix}.cpu_threads must be >= 0 (got {self.cpu_threads})")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"{prefix}.dist_timeout_s must be > 0 (got {self.dist_timeout_s})")


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
