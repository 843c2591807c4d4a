"""The only caller of ``deepspeed.initialize``: our optimizer and engine config -> a DeepSpeed engine.

AdamW is ``torch.optim.AdamW`` (fused on CUDA): DeepSpeed's CPU Adam would cost a minute of
compilation on every fresh CPU machine. Biases, norms, embeddings, the logit scale and bias get
no weight decay. The LR schedule is linear warmup then cosine, stepped by the engine.
DeepSpeed's own gradient accumulation stays at 1: ``train.accum_steps`` is GradCache, which keeps
every negative (see ``mmpretrain.loss``).
"""

from __future__ import annotations

import math
import os
import statistics
import sys

import torch

from mmpretrain.distributed import all_reduce_number, is_initialized  # (sets DS_ACCELERATOR before deepspeed)
from mmpretrain.engine_config import EngineConfig, OptimConfig


def cpu_thread_choices(cfg: EngineConfig, *, ranks_on_node: int, data_workers: int) -> list[int]:
    """The intra-op thread counts a CPU rank may use, the conservative first: engine.cpu_threads when set, else
    the cores left per rank after its data workers and all the cores per rank (one choice when they agree)."""
    if cfg.cpu_threads:
        return [cfg.cpu_threads]
    per_rank = max(1, (os.cpu_count() or 1) // ranks_on_node)
    return sorted({max(1, per_rank - data_workers), per_rank})


class CpuThreadTuner:
    """engine.cpu_threads=0 on a CPU run: which thread count trains faster is measured, not guessed.

    Whether a data worker's core is better left to it or shared depends on the model and the data (on 2 cores
    with one worker: the tiny demo, light compute and cheap decode, runs 1.3x faster on 1 thread; the bench-tiny
    model on photo shards 1.4x faster on 2). When there is a choice the run's own steps are timed: steps
    WARM+1..WARM+N on the fewer threads, then (after one step to settle) N on the more; the median step wall time,
    data wait included and the worst rank's, decides, and the more threads must win by 5%. Training goes on
    meanwhile; nothing is run twice. The choice is logged and saved in the train state, so a resumed run keeps
    it (and takes the same steps in the same thread count as the uninterrupted run once chosen)."""

    WARM, N = 3, 6

    def __init__(self, choices: list[int], chosen: int = 0):
        if is_initialized() and all_reduce_number(len(choices), "min") < 2:  # a collective: all tune or none
            choices = choices[:1]
        self.choices = choices
        self.chosen = chosen if chosen in choices else (choices[0] if len(choices) == 1 else 0)
        self.times: list[float] = []
        self.steps = 0
        self.line = ""  # the choice, for the log (set when it is made)
        torch.set_num_threads(self.chosen or choices[0])

    @property
    def threads(self) -> int:
        return self.chosen or torch.get_num_threads()

    def step_done(self, wall_s: float) -> dict:
        """After each step of this invocation; returns {} or, at the decision, what to log."""
        if self.chosen:
            return {}
        self.steps += 1
        lo, hi = self.choices
        w, n = self.WARM, self.N
        if w < self.steps <= w + n or w + n + 1 < self.steps:
            self.times.append(wall_s)
        if self.steps == w + n:
            torch.set_num_threads(hi)
        if self.steps < w + 2 * n + 1:
            return {}
        few = statistics.median(self.times[:n])
        many = statistics.median(self.times[n:])
        if is_initialized():  # every rank takes the same count: the slowest rank's times decide
            few, many = all_reduce_number(few, "max"), all_reduce_number(many, "max")
        self.chosen = hi if many < 0.95 * few else lo
        torch.set_num_threads(self.chosen)
        self.line = (f"cpu threads: {self.chosen} (median step {few * 1e3:.1f} ms on {lo}, {many * 1e3:.1f} ms on "
                     f"{hi}; engine.cpu_threads=N fixes it)")  # fmt: skip
        return {"cpu_threads": self.chosen, f"cpu_threads/step_s_{lo}": few, f"cpu_threads/step_s_{hi}": many}


def set_cpu_threads(cfg: EngineConfig, *, ranks_on_node: int, data_workers: int, chosen: int = 0):
    """torch's intra-op threads for a CPU run: a CpuThreadTuner (None on CUDA, which keeps torch's default).
    ``chosen``: the count a resumed run chose before."""
    if torch.cuda.is_available():
        return None
    return CpuThreadTuner(cpu_thread_choices(cfg, ranks_on_node=ranks_on_node, data_workers=data_workers), chosen)


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


def release_engine(ds_engine) -> None:
    """Take DeepSpeed's hooks off the model (``engine.destroy()``), while the process group still exists: call it
    once a run is done with its engine. The hooks sit on parameters and modules, where C++ holds them, so without
    this the engine outlives the run, and with it the process groups it cloned: their gloo threads are then still
    running when the interpreter exits, and a rank now and then aborts in exit ("terminate called without an active
    exception", exit -6) after all its work is done. mmpretrain.distributed.destroy collects the freed engine.

    ZeRO-3 (DeepSpeed 0.19) also keeps the model where ``destroy()`` leaves it, and the model's hooks hold the
    engine: on a module-level list (``parameter_offload.FWD_MODULE_STACK``, its forward hooks' stack) and in a
    class-level ``functools.lru_cache`` of the parameter coordinator keyed by (coordinator, module). Both are let go
    here (the cache is only a cache: it refills on the next forward of any other engine)."""
    if ds_engine is None:
        return
    ds_engine.destroy()
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not ds_engine.module]
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    for fn in vars(cls).values() if cls is not None else ():
        for held in [fn, *vars_of_closure(fn)]:
            if callable(getattr(held, "cache_clear", None)):  # the lru_cache, bare or inside DeepSpeed's nvtx wrapper
                held.cache_clear()


def vars_of_closure(fn) -> list:
    """The values a function's closure holds (its empty cells left out)."""
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out


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
