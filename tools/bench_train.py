"""Benchmark the train step: steady-state samples/s, peak memory and MFU, optionally against OpenCLIP.

    python tools/bench_train.py configs/bench-tiny.yaml --openclip          # ours vs OpenCLIP, same model
    python tools/bench_train.py configs/vit-b-16-laion.yaml train.batch_size=256 --steps 30
    torchrun --nproc_per_node=2 tools/bench_train.py configs/bench-tiny.yaml   # ours on 2 ranks
    python tools/bench_train.py configs/bench-tiny.yaml --openclip --threads 1 --breakdown \
        --ours-change no_guard --openclip-fused      # where time goes
    python tools/bench_train.py configs/bench-tiny.yaml --openclip --batch-sizes 16,32,64,128 --plot docs/x.png

What is timed: one optimizer step exactly as the trainer runs it -- `mmpretrain.step.TrainStep`
through the DeepSpeed engine `build_engine` returns (forward, loss, backward with the StepGuard's
non-finite-gradient hooks, gradient norm and clipping, AdamW step, LR schedule). The batches are
synthetic and already on the device (random images, random token ids ending in an EOT token), so neither
the data loader nor the host-to-device copy is measured. `--warmup` steps run first (allocations, AdamW
state creation); then `--steps` steps are timed one by one and reported by their median (samples/s =
global batch / median step time; robust to a loaded machine). Runs in a world of 1, or under torchrun on
N ranks (each rank gets `train.batch_size / N` samples; the table reports the global batch and rank 0's
memory).

With `--openclip` (world of 1 only) the SAME model is built as an OpenCLIP custom config
(`open_clip.create_model` of a registered `model_cfg`: embed_dim, vision_cfg, text_cfg) and its
train step -- forward, `open_clip.loss.ClipLoss`, backward, gradient clipping at `optim.grad_clip`,
`torch.optim.AdamW` (same hyper-parameters, fused on CUDA like ours), logit-scale clamp as OpenCLIP's
trainer does -- is timed in the same process, with the same batch and threads. After both warm up,
the timed steps alternate (ours, OpenCLIP, ours, ...) so that a change in machine load hits both.
bf16 configs run OpenCLIP under `torch.autocast(bfloat16)`, as its trainer's `amp_bf16` does.

`--breakdown` times each phase of the step (after the timed steps, in as many extra interleaved steps):
for ours, spans around the engine's forward, `compute_loss`, `engine.backward` (autograd, the StepGuard's
gradient hooks, and DeepSpeed's gradient all-reduce, shown apart), the step's norm and clipping, and `engine.step`
(DeepSpeed's clipping and AdamW shown apart; the LR schedule and zero_grad are the rest of it); for OpenCLIP,
the same phases of its step. "other" is what falls outside the spans (input normalization, the guard's flags).

`--ours-change a,b` adds a row: ours with changes to files this tool does not own (engine.py, train.py,
faults.py, kernels/) applied from outside the trainer, so a proposal is measured before it lands; the
names and what each stands for are in `OURS_CHANGES`. `--openclip-fused` adds OpenCLIP stepped with
`AdamW(fused=True)` (its trainer does not ask for it), so that a faster optimizer is credited to both.
`--batch-sizes 16,32,...` repeats the whole comparison per global batch size and `--plot` draws samples/s
against it.

Peak memory, per implementation, measured while it is built and warmed up (its first AdamW step
allocates the optimizer state), above what was in use just before:
- CUDA: `torch.cuda.max_memory_allocated()` (reset at the phase start) minus `memory_allocated()`
  at the phase start: parameters, gradients, optimizer state and activations of this model.
- CPU: the process RSS high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), reset at the
  phase start through /proc/self/clear_refs (Linux) after `malloc_trim` gave freed heap back, minus
  the RSS at the phase start. RSS counts allocator slack and touched pages: an approximation.

Model FLOPs (``train_flops_per_sample``, PaLM-style MFU accounting; forward = 2 FLOPs per
multiply-add of a weight matmul, training = 3x forward)::

    per tower:  6 * N * (layers * (4 D^2 + 2 D F))       QKV + out projections, MLP; N tokens, F mlp_dim
              + 12 * layers * N^2 * D                     attention scores QK^T and AV (causal counted full)
              + 6 * D * E                                 output projection on the pooled token (CLIP)
    executed:   the model runs the last block of a tower on the pooled token only (class / EOT / last
                position): there 6 * (3 N D^2 + D^2 + 2 D F) + 12 * N * D (+ 12 * N^2 * D instead for the
                causal CLIP text tower, whose attention runs for every query); SigLIP vision runs in full.
                MFU counts the architecture's FLOPs above; the header also prints the executed count.
    vision:     + 6 * P * (3 p^2 D)                       patch embedding as a matmul; P patches of side p
                N = P (+1 class token for CLIP); with patch dropout, the kept patches
                SigLIP head: 6 * (2 D^2 N + 2 D^2 + 2 D F) + 12 * N * D   (one learned query)
    text:       N = context_length; SigLIP's linear head 6 * D * E
    loss:       6 * B * E                                 the B x B x E similarity matmul, per sample

Biases, norms, activations, softmax and embedding lookups are not counted. MFU = FLOPs per sample
x samples/s / peak dense TFLOP/s of the device (table ``PEAK_TFLOPS``, by device name; fp32 counts
the TF32 peak only when `torch.get_float32_matmul_precision()` is not "highest"). On CPU, or on a device
missing from the table, MFU is n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from mmpretrain.config import ConfigError, load_config
from mmpretrain.distributed import destroy, env_rank_world, init_distributed, print0

# Peak dense TFLOP/s from NVIDIA's datasheets (sparsity excluded): (name substrings, bf16/fp16, tf32, fp32).
# First match wins, so the more specific names come first.
PEAK_TFLOPS = [
    (("H100", "PCIe"), 756.0, 378.0, 51.2),
    (("H100", "NVL"), 835.0, 417.5, 60.0),
    (("H200", "NVL"), 835.0, 417.5, 60.0),
    (("GH200",), 989.0, 494.7, 66.9),
    (("H100",), 989.0, 494.7, 66.9),  # SXM
    (("H200",), 989.0, 494.7, 66.9),  # SXM
    (("A100",), 312.0, 156.0, 19.5),
]


@dataclass
class PhaseResult:
    """One implementation's measurements."""

    impl: str
    num_params: int
    step_s: list = field(default_factory=list)  # timed step durations, seconds
    peak_mem_bytes: int = 0
    breakdown: Breakdown | None = None  # where the time of a step goes (--breakdown)

    def median_step_s(self) -> float:
        return statistics.median(self.step_s)


# ----------------------------------------------------------------------------- FLOPs


def _tower_block_flops(num_tokens: int, width: int, mlp_dim: int, layers: int, last: str = "full") -> int:
    """Forward FLOPs of `layers` pre-LN blocks on one sequence: weight matmuls + attention.

    last: "full" (every token through every block), "pooled" (the model's pooled_only path for a non-causal
    tower: the last block's qkv on every token, attention for the one pooled query, out-projection and MLP on
    that token) or "pooled_causal" (the same, but the causal attention runs for every query, see
    mmpretrain.model.layers.Attention).
    """
    N, D, F = num_tokens, width, mlp_dim
    block = 2 * N * (4 * D * D + 2 * D * F) + 4 * N * N * D  # qkv 3D^2 + out D^2 + fc1, fc2 DF each; QK^T, AV
    if last == "full":
        return layers * block
    attn = 4 * N * N * D if last == "pooled_causal" else 4 * N * D
    return (layers - 1) * block + 2 * N * 3 * D * D + attn + 2 * (D * D + 2 * D * F)


def forward_flops_per_sample(model_cfg, batch_size: int, training: bool = True, pooled: bool = False) -> dict:
    """Forward FLOPs of one sample: {"vision", "text", "loss"} for a resolved ModelConfig.

    `batch_size` is the global batch (the similarity matrix is B x B); `training` applies patch dropout;
    `pooled=False` (the default, what MFU uses): the architecture's FLOPs, every token through every block,
    as PaLM-style model FLOPs count them whatever the implementation skips; True: what encode_image /
    encode_text actually run (the last block on the pooled token only, see mmpretrain.model.layers.Encoder).
    """
    m, v, t = model_cfg, model_cfg.vision, model_cfg.text
    grid = v.image_size // v.patch_size
    num_patches = grid * grid
    patch_embed = 2 * num_patches * 3 * v.patch_size**2 * v.width  # every patch embedded, before dropout
    kept = max(1, int(num_patches * (1 - v.patch_dropout))) if training and v.patch_dropout > 0 else num_patches
    if m.family == "clip":
        n_v = 1 + kept  # class token
        last = "pooled" if pooled else "full"
        vision = patch_embed + _tower_block_flops(n_v, v.width, v.mlp_dim, v.layers, last) + 2 * v.width * m.embed_dim
    else:  # the attention-pooling head reads every token: no pooled shortcut
        n_v = kept
        head = 2 * (2 * v.width * v.width * n_v + 2 * v.width * v.width + 2 * v.width * v.mlp_dim) + 4 * n_v * v.width
        vision = patch_embed + _tower_block_flops(n_v, v.width, v.mlp_dim, v.layers) + head
    text_last = ("pooled_causal" if m.family == "clip" else "pooled") if pooled else "full"
    text = _tower_block_flops(t.context_length, t.width, t.mlp_dim, t.layers, text_last) + 2 * t.width * m.embed_dim
    return {"vision": vision, "text": text, "loss": 2 * batch_size * m.embed_dim}


def train_flops_per_sample(model_cfg, batch_size: int, pooled: bool = False) -> int:
    """Training FLOPs of one sample: 3x the forward (backward = 2x forward); `pooled` as in forward_flops_per_sample."""
    return 3 * sum(forward_flops_per_sample(model_cfg, batch_size, training=True, pooled=pooled).values())


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s for this precision on this device; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for keys, half, tf32, fp32 in PEAK_TFLOPS:
        if all(k in name for k in keys):
            if precision in ("bf16", "fp16", "amp_bf16"):
                return half
            return fp32 if torch.get_float32_matmul_precision() == "highest" else tf32
    return None


# ----------------------------------------------------------------------------- memory


class MemoryMeter:
    """Peak memory of a phase above what was in use at its start (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "CUDA max_memory_allocated"
        else:
            self.kind = "RSS high-water mark (getrusage ru_maxrss), reset per phase"
            self.can_reset = os.path.exists("/proc/self/clear_refs")
            if not self.can_reset:
                self.kind = "RSS high-water mark (getrusage ru_maxrss), NOT reset: later phases under-read"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so RSS counts live memory
        except (OSError, AttributeError):
            pass
        if self.can_reset:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
            except OSError:
                self.can_reset = False
        self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if self.can_reset else _rss_bytes()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- where time goes


class Breakdown:
    """Wall time of each phase of a step (seconds, summed within the step), recorded only while `on`.

    Phases are spans around calls (`wrap` patches a method or module function on one object); a span
    inside another (e.g. DeepSpeed's all-reduce inside backward) is reported as a sub-phase of it.
    Everything a step does outside the spans is "other".
    """

    def __init__(self, phases: list):
        self.phases = phases  # [(key, parent key or None)], in report order
        self.on = False
        self.steps: list = []
        self._cur = None

    @contextlib.contextmanager
    def step(self):
        self._cur = defaultdict(float) if self.on else None
        t0 = time.perf_counter()
        yield
        if self._cur is not None:
            self._cur["total"] = time.perf_counter() - t0
            self.steps.append(self._cur)
        self._cur = None

    @contextlib.contextmanager
    def span(self, key: str):
        if self._cur is None:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._cur[key] += time.perf_counter() - t0

    def wrap(self, obj, attr: str, key: str) -> None:
        fn = getattr(obj, attr)

        def timed_fn(*args, **kwargs):
            with self.span(key):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed_fn)

    def medians_ms(self) -> dict:
        """{phase: median ms over the recorded steps}, with "other" = total - top-level phases."""
        out = {}
        for key in ["total"] + [k for k, _ in self.phases]:
            out[key] = statistics.median(s.get(key, 0.0) for s in self.steps) * 1e3
        top = [k for k, parent in self.phases if parent is None]
        out["other"] = statistics.median(s["total"] - sum(s.get(k, 0.0) for k in top) for s in self.steps) * 1e3
        return out


def format_breakdown(results: list) -> str:
    """One column per implementation; rows are the union of their phases (ms, median step)."""
    rows, parents = [], {}
    for r in results:
        for key, parent in r.breakdown.phases:
            if key not in parents:
                rows.append(key)
                parents[key] = parent
    med = [r.breakdown.medians_ms() for r in results]
    lines = ["| phase (ms per step, median) | " + " | ".join(r.impl for r in results) + " |",
             "|---|" + "---:|" * len(results)]  # fmt: skip
    for key in rows + ["other", "total"]:
        label = f"&nbsp;&nbsp;of which {key}" if parents.get(key) else key
        cells = [f"{m[key]:.1f}" if key in m and (key in ("other", "total") or any(k == key for k, _ in
                 r.breakdown.phases)) else "-" for m, r in zip(med, results)]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Changes to files this tool does not own (engine.py, train.py), applied to our engine from outside so
# that each one's gain is measured before it lands. `--ours-change a,b` adds a row "mmpretrain +a+b".
OURS_CHANGES = {
    "guard_sum": "StepGuard's hook tests isfinite(grad.sum()) instead of isfinite(grad).all() (one reduction, no "
    "bool tensor; a NaN/inf anywhere makes the sum non-finite; a false alarm needs finite gradients summing past "
    "3e38); only where the guard's hooks run (DeepSpeed clips: ZeRO 1-3, bf16/fp16 weights)",
    "attn_math": "kernels.attention on CPU without a mask: softmax(q k^T * scale) v in plain torch ops instead of "
    "SDPA's CPU flash kernel (whose backward is slow at these head sizes)",
    "full_last_block": "undo a change to our model (for attribution): encode_image / encode_text run the last "
    "block on every token, as before the pooled-token shortcut",
    "no_guard": "no StepGuard gradient hooks (where DeepSpeed clips: faults.py, isfinite over every gradient); "
    "measures their cost only",
}


@contextlib.contextmanager
def _swapped(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


# ----------------------------------------------------------------------------- the two train steps


def synthetic_batch(model_cfg, batch_size: int, device: torch.device, seed: int) -> dict:
    """Random images (B, 3, H, W) ~ N(0, 1) and tokens (B, L): SOT, random ids, EOT (the largest id), padding."""
    g = torch.Generator().manual_seed(seed)
    v, t = model_cfg.vision, model_cfg.text
    images = torch.randn(batch_size, 3, v.image_size, v.image_size, generator=g)
    L = t.context_length
    tokens = torch.zeros(batch_size, L, dtype=torch.long)
    lengths = torch.randint(3, L + 1, (batch_size,), generator=g)  # SOT + >= 1 word + EOT
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = t.vocab_size - 2  # SOT
        tokens[i, 1 : n - 1] = torch.randint(1, t.vocab_size - 2, (n - 2,), generator=g)
        tokens[i, n - 1] = t.vocab_size - 1  # EOT: both models pool at the argmax
    return {"image": images.to(device), "text": tokens.to(device)}


OURS_PHASES = [
    ("forward", None),  # engine(images, tokens): both towers, normalized features
    ("loss", None),  # mmpretrain.loss.compute_loss
    ("backward", None),  # engine.backward: autograd (+ the StepGuard hooks) + DeepSpeed's gradient all-reduce
    ("DeepSpeed gradient all-reduce", "backward"),
    ("grad norm + clip", None),  # TrainStep: the norm and clipping on the device (ZeRO 0, fp32 / amp_bf16)
    ("optimizer step", None),  # engine.step: (DeepSpeed's clipping,) AdamW, LR schedule, zero_grad
    ("clip (DeepSpeed)", "optimizer step"),
    ("AdamW", "optimizer step"),
]


def build_ours(cfg, device: torch.device, per_rank_batch: int, changes: tuple = ()):
    """(step(batch), num_params, Breakdown): the trainer's own engine and TrainStep, with `changes`
    (keys of OURS_CHANGES) applied from outside."""
    import mmpretrain.loss
    import mmpretrain.model.layers
    from mmpretrain.engine import build_engine
    from mmpretrain.faults import StepGuard
    from mmpretrain.model import build_model
    from mmpretrain.objectives import Objective
    from mmpretrain.step import TrainStep

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    num_params = sum(p.numel() for p in model.parameters())
    if "full_last_block" in changes:
        normalize = torch.nn.functional.normalize
        model.encode_image = lambda images: normalize(model.vision_model(images).embeds.float(), dim=-1)
        model.encode_text = lambda tokens: normalize(model.text_model(tokens).embeds.float(), dim=-1)
    engine = build_engine(model, cfg.optim, cfg.engine, micro_batch_size=per_rank_batch, total_steps=cfg.train.steps)
    train_step = TrainStep(engine, Objective(cfg), cfg.engine, accum_steps=cfg.train.accum_steps,
                           grad_clip=cfg.optim.grad_clip, loss_cfg=cfg.loss, device=device)  # fmt: skip
    if "no_guard" in changes:
        train_step.guard = None  # where the step clips, the norm check stays (it is free)
    elif "guard_sum" in changes and train_step.guard is not None:

        class SumGuard(StepGuard):
            def _hook(self, grad):
                self.bad.logical_or_(~torch.isfinite(grad.sum()))

        train_step.guard = SumGuard(engine.module, device)
    attention_fn = kernel = mmpretrain.model.layers.attention
    if "attn_math" in changes:

        def attention_math(q, k, v, causal=False, key_padding_mask=None, scale=None, impl="auto"):
            if q.is_cuda or key_padding_mask is not None:
                return kernel(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, impl=impl)
            s_BHMN = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
            if causal:  # top-left aligned, as SDPA's is_causal
                M, N = s_BHMN.shape[-2:]
                s_BHMN = s_BHMN.masked_fill(torch.ones(M, N, dtype=torch.bool, device=q.device).triu(1), -math.inf)
            return s_BHMN.softmax(-1) @ v

        attention_fn = attention_math
    bd = Breakdown(OURS_PHASES)
    bd.wrap(engine, "forward", "forward")
    bd.wrap(engine, "backward", "backward")
    bd.wrap(engine, "allreduce_gradients", "DeepSpeed gradient all-reduce")
    bd.wrap(engine, "step", "optimizer step")
    bd.wrap(engine, "clip_fp32_gradients", "clip (DeepSpeed)")
    bd.wrap(engine.optimizer, "step", "AdamW")
    bd.wrap(train_step, "_norm_and_clip", "grad norm + clip")
    compute_loss = mmpretrain.loss.compute_loss

    def timed_loss(*args, **kwargs):
        with bd.span("loss"):
            return compute_loss(*args, **kwargs)

    def step(batch):
        with bd.step(), _swapped(mmpretrain.loss, "compute_loss", timed_loss), \
                _swapped(mmpretrain.model.layers, "attention", attention_fn):  # fmt: skip
            return train_step(batch)

    return step, num_params, bd


class TorchEngine:
    """The DeepSpeed engine's interface as `train_step` uses it, in plain PyTorch: fp32 weights, the forward
    under torch.autocast (bf16 for engine.precision bf16 / amp_bf16), fused AdamW, the same LR schedule and
    clipping. Prices DeepSpeed's wrapper: the same train_step, model and objective run through both."""

    world_size = 1

    def __init__(self, model, optimizer, scheduler, autocast_dtype, device: torch.device):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.autocast_dtype, self.device = autocast_dtype, device

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.module(*args, **kwargs)

    forward = __call__

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def zero_optimization_stage(self):
        return 0

    def gradient_clipping(self):
        return 0.0  # TrainStep clips (torch.nn.utils.clip_grad_norm_), as for ours at ZeRO 0 with fp32 weights

    def get_global_grad_norm(self):
        return None

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def set_gradient_accumulation_boundary(self, last: bool):
        pass


def build_torch(cfg, device: torch.device):
    """(step(batch), num_params, Breakdown): our model, objective and TrainStep without DeepSpeed (TorchEngine)."""
    from mmpretrain.engine import compile_enabled, lr_lambda
    from mmpretrain.model import build_model, compile_blocks, param_groups
    from mmpretrain.objectives import Objective
    from mmpretrain.step import TrainStep

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    objective = Objective(cfg)
    objective.attach_heads(model)
    num_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if compile_enabled(cfg.engine, device):
        compile_blocks(model)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=True)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, cfg.train.steps))
    autocast = torch.bfloat16 if cfg.engine.precision in ("bf16", "amp_bf16") else None
    engine = TorchEngine(model, opt, sched, autocast, device)
    objective.setup(device)
    # fp32 weights here whatever the precision: the step normalizes images to fp32 and clips (as ours at ZeRO 0)
    step_engine_cfg = copy.deepcopy(cfg.engine)
    step_engine_cfg.precision = "amp_bf16" if autocast is not None else "fp32"
    step_engine_cfg.zero_stage = 0
    train_step = TrainStep(engine, objective, step_engine_cfg, accum_steps=cfg.train.accum_steps,
                           grad_clip=o.grad_clip, loss_cfg=cfg.loss, device=device)  # fmt: skip
    bd = Breakdown([("step", None)])

    def step(batch):
        with bd.step():
            return train_step(batch)

    return step, num_params, bd


def openclip_model_cfg(model_cfg) -> dict:
    """Our resolved CLIP ModelConfig as an OpenCLIP custom config (model_cfg dict); ValueError where it cannot."""
    m, v, t = model_cfg, model_cfg.vision, model_cfg.text
    if m.family != "clip":
        raise ValueError(f"--openclip: model.family must be clip (got {m.family!r}); OpenCLIP's SigLIP differs")
    if v.act != t.act or v.act not in ("gelu", "quick_gelu"):
        raise ValueError(f"--openclip: model.vision.act and model.text.act must both be gelu or quick_gelu "
                         f"(got {v.act!r}, {t.act!r})")  # fmt: skip
    for key, value in (("vision.ln_eps", v.ln_eps), ("text.ln_eps", t.ln_eps)):
        if value != 1e-5:
            raise ValueError(f"--openclip: model.{key} must be 1e-5, OpenCLIP's LayerNorm eps (got {value})")
    if m.lock_image:
        raise ValueError("--openclip: model.lock_image is not supported")
    return {
        "embed_dim": m.embed_dim,
        "quick_gelu": v.act == "quick_gelu",
        "vision_cfg": {
            "image_size": v.image_size,
            "layers": v.layers,
            "width": v.width,
            "head_width": v.width // v.heads,
            "mlp_ratio": v.mlp_dim / v.width,
            "patch_size": v.patch_size,
            "patch_dropout": v.patch_dropout,
        },
        "text_cfg": {
            "context_length": t.context_length,
            "vocab_size": t.vocab_size,
            "width": t.width,
            "heads": t.heads,
            "layers": t.layers,
            "mlp_ratio": t.mlp_dim / t.width,
        },
    }


def create_openclip_model(model_cfg, device: torch.device):
    """open_clip.create_model of our config, registered under a temporary name (random init, no download)."""
    import open_clip

    name = "mmpretrain-bench"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w") as f:
            json.dump(openclip_model_cfg(model_cfg), f)
        open_clip.add_model_config(path)
        return open_clip.create_model(name, pretrained=None, precision="fp32", device=device)


OPENCLIP_PHASES = [("forward", None), ("loss", None), ("backward", None), ("grad norm + clip", None),
                   ("AdamW", None)]  # fmt: skip


def build_openclip(cfg, device: torch.device, fused_adamw: bool = False, compile: bool = False):
    """(step(batch), num_params, Breakdown): OpenCLIP's model and loss with a torch AdamW, as its trainer steps.

    `fused_adamw`: AdamW(fused=True) on CPU too (OpenCLIP's trainer passes no such flag: the default).
    `compile`: torch.compile(model), what OpenCLIP's trainer does with --torchcompile."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.train.seed)
    model = create_openclip_model(cfg.model, device)
    model.train()
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    num_params = sum(p.numel() for p in model.parameters())
    o = cfg.optim
    # OpenCLIP's trainer: no weight decay on 1-D parameters and names with bn/ln/bias/logit_scale.
    no_decay = lambda n, p: p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": o.weight_decay},
    ]
    fused = device.type == "cuda" or fused_adamw
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)
    backend = os.environ.get("MMPRETRAIN_COMPILE_BACKEND", "inductor")  # as mmpretrain.model.compile_blocks
    forward = torch.compile(model, backend=backend) if compile else model
    loss_fn = ClipLoss()
    autocast_dtype = torch.bfloat16 if cfg.engine.precision in ("bf16", "amp_bf16") else None  # fp16 refused
    bd = Breakdown(OPENCLIP_PHASES)

    def step(batch):
        with bd.step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                with bd.span("forward"):
                    image_features, text_features, logit_scale = forward(batch["image"], batch["text"])
                with bd.span("loss"):
                    loss = loss_fn(image_features, text_features, logit_scale)
            with bd.span("backward"):
                loss.backward()
            if o.grad_clip > 0:
                with bd.span("grad norm + clip"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            with bd.span("AdamW"):
                opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # as OpenCLIP's train loop, after every step
            return loss.detach()

    return step, num_params, bd


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batch, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step(batch)
    _sync(device)
    return time.perf_counter() - t0


def warm_up(name: str, build, meter: MemoryMeter, batch, device, warmup: int):
    """Build one implementation and run its warmup steps inside a memory phase."""
    meter.start()
    step, num_params, breakdown = build()
    for _ in range(max(1, warmup)):  # >= 1: the first AdamW step allocates its state (part of the peak)
        step(batch)
    _sync(device)
    return step, PhaseResult(name, num_params, peak_mem_bytes=meter.peak(), breakdown=breakdown)


def format_table(results: list, global_batch: int, flops_per_sample: int, peak: float | None) -> str:
    lines = [
        "| impl | params | samples/s | step ms | peak memory MiB | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        sps = global_batch / r.median_step_s()
        mfu = f"{flops_per_sample * sps / (peak * 1e12):.1%}" if peak else "n/a"
        lines.append(f"| {r.impl} | {r.num_params:,} | {sps:.1f} | {r.median_step_s() * 1e3:.1f} | "
                     f"{r.peak_mem_bytes / 2**20:.0f} | {mfu} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/bench_train.py", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML config (e.g. configs/bench-tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=128")
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5, at least 1)")
    p.add_argument("--openclip", action="store_true", help="also time the same model built with OpenCLIP")
    p.add_argument("--openclip-fused", action="store_true",
                   help="with --openclip: one more OpenCLIP row stepped with AdamW(fused=True)")  # fmt: skip
    p.add_argument(
        "--ours-change",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help=f"one more row of ours with these changes applied (repeatable): {', '.join(OURS_CHANGES)}",
    )
    p.add_argument(
        "--torch",
        action="store_true",
        help="one more row: our model and train_step in plain PyTorch (no DeepSpeed; autocast for bf16)",
    )
    p.add_argument(
        "--ours-config",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="one more row of ours with these config overrides (repeatable), e.g. engine.compile=false",
    )
    p.add_argument(
        "--openclip-compile",
        action="store_true",
        help="with --openclip: one more OpenCLIP row with torch.compile(model) (its --torchcompile)",
    )
    p.add_argument(
        "--profile",
        default="",
        metavar="JSON",
        help="after timing, profile 3 steps of the first row (torch.profiler): top kernels, GPU idle "
        "fraction, host-device syncs per step, written to this JSON",
    )
    p.add_argument("--breakdown", action="store_true", help="time each phase of the step (forward, backward, ...)")
    p.add_argument(
        "--batch-sizes",
        default="",
        metavar="B1,B2,...",
        help="repeat the whole comparison at these global batch sizes (default: train.batch_size)",
    )
    p.add_argument("--plot", default="", metavar="PNG", help="write samples/s vs batch size to this PNG")
    p.add_argument("--json", default="", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's default)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 0:
        p.error("--steps must be >= 1, --warmup and --threads >= 0")
    args.ours_change = [tuple(c for c in spec.split(",") if c) for spec in args.ours_change]
    for changes in args.ours_change:
        for c in changes:
            if c not in OURS_CHANGES:
                p.error(f"--ours-change: unknown change {c!r} (known: {', '.join(OURS_CHANGES)})")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        p.error(f"--batch-sizes: want integers like 16,32,64 (got {args.batch_sizes!r})")
    if any(b < 1 for b in args.batch_sizes):
        p.error("--batch-sizes must be >= 1")
    return args


def compare(cfg, args, device, world: int, rank: int, meter: MemoryMeter) -> list:
    """Build every implementation at cfg.train.batch_size, warm each up, then time interleaved steps."""
    per_rank = cfg.train.batch_size // world
    batch = synthetic_batch(cfg.model, per_rank, device, seed=cfg.train.seed + rank)
    phases = [("mmpretrain (DeepSpeed)", lambda: build_ours(cfg, device, per_rank))]
    if args.openclip:
        phases.append(("open_clip", lambda: build_openclip(cfg, device)))
    for changes in args.ours_change:
        phases.append(("mmpretrain +" + "+".join(changes), lambda ch=changes: build_ours(cfg, device, per_rank, ch)))
    for extra in args.ours_config:
        other = load_config(args.config, [*args.overrides, *extra.split()])
        other.train.batch_size = cfg.train.batch_size
        phases.append((f"mmpretrain {extra}", lambda c=other: build_ours(c, device, per_rank)))
    if args.torch:
        phases.append(("torch (no DeepSpeed)", lambda: build_torch(cfg, device)))
    if args.openclip and args.openclip_fused:
        phases.append(("open_clip +fused_adamw", lambda: build_openclip(cfg, device, fused_adamw=True)))
    if args.openclip and args.openclip_compile:
        phases.append(("open_clip +compile", lambda: build_openclip(cfg, device, compile=True)))
    steps, results = [], []
    for name, build in phases:
        step, result = warm_up(name, build, meter, batch, device, args.warmup)
        steps.append(step)
        results.append(result)
    for _ in range(args.steps):  # interleaved: a change in load hits every implementation alike
        for step, result in zip(steps, results):
            result.step_s.append(timed(step, batch, device))
    if args.profile:
        profile_steps(steps[0], batch, device, args.profile, results[0].impl)
    if args.breakdown:  # separate steps (the spans cost ~10 us each), interleaved the same way
        for r in results:
            r.breakdown.on = True
        for _ in range(args.steps):
            for step in steps:
                step(batch)
    del steps
    gc.collect()
    return results


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_steps(step, batch, device: torch.device, path: str, impl: str, n: int = 3) -> dict:
    """torch.profiler over n steps: top kernels by device time, the fraction of the steps' wall time in which no
    kernel runs on the GPU, and host-device synchronizations per step; written to `path` as JSON."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step(batch)
        _sync(device)
        wall_s = time.perf_counter() - t0
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    busy_us, end = 0.0, -math.inf
    for a, b in kernels:  # length of the union of the kernels' intervals
        if b > end:
            busy_us += b - max(a, end)
            end = b
    span_us = (kernels[-1][1] - kernels[0][0]) if kernels else 0.0
    dev_time = lambda e: getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)  # noqa: E731
    averages = prof.key_averages()
    top = sorted((e for e in averages if dev_time(e) > 0), key=dev_time, reverse=True)[:30]
    total_dev = sum(dev_time(e) for e in averages if e.device_type == DeviceType.CUDA) or 1.0
    syncs = {e.key: e.count / n for e in averages if e.key in SYNC_CALLS or e.key == "aten::_local_scalar_dense"}
    out = {
        "impl": impl,
        "steps": n,
        "wall_ms_per_step": wall_s * 1e3 / n,
        "gpu_busy_ms_per_step": busy_us / 1e3 / n,
        "gpu_idle_frac_of_wall": (1 - busy_us / 1e6 / wall_s) if kernels else None,
        "gpu_idle_frac_of_kernel_span": (1 - busy_us / span_us) if span_us else None,
        "kernels_per_step": len(kernels) / n,
        "syncs_per_step": syncs,
        "top_kernels": [
            {
                "name": e.key[:160],
                "ms_per_step": dev_time(e) / 1e3 / n,
                "calls_per_step": e.count / n,
                "frac_of_device_time": dev_time(e) / total_dev,
            }
            for e in top
        ],  # fmt: skip
        "top_cpu_ops": [
            {"name": e.key[:160], "cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n, "calls_per_step": e.count / n}
            for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
        ],
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print0(f"profile of {impl}: {out['wall_ms_per_step']:.1f} ms/step wall, GPU busy {out['gpu_busy_ms_per_step']:.1f} "
           f"ms/step, {out['kernels_per_step']:.0f} kernels/step, syncs/step {syncs}; wrote {path}")  # fmt: skip
    return out


def write_plot(path: str, sweep: list, title: str) -> None:
    """Left: samples/s vs global batch size, one line per implementation. Right (with an open_clip row):
    each implementation's samples/s over open_clip's, measured in the same interleaved rounds, which a
    change in machine load between batch sizes moves far less than the absolute numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for point in sweep for r in point["results"]))
    has_ref = all(any(r["impl"] == "open_clip" for r in p["results"]) for p in sweep)
    fig, axes = plt.subplots(1, 2 if has_ref else 1, figsize=(11 if has_ref else 6.4, 4.4), dpi=110, squeeze=False)
    sizes = [p["batch_size"] for p in sweep]
    for impl in impls:
        pts = []  # (batch size, samples/s, open_clip's samples/s in the same rounds)
        for p in sweep:
            ref = next((o["samples_per_s"] for o in p["results"] if o["impl"] == "open_clip"), None)
            pts += [(p["batch_size"], r["samples_per_s"], ref) for r in p["results"] if r["impl"] == impl]
        axes[0][0].plot([b for b, _, _ in pts], [y for _, y, _ in pts], marker="o", label=impl)
        if has_ref:
            axes[0][1].plot([b for b, _, _ in pts], [y / ref for _, y, ref in pts], marker="o", label=impl)
    axes[0][0].set_ylabel("samples/s (median step)")
    axes[0][0].set_ylim(bottom=0)
    if has_ref:
        axes[0][1].axhline(1.3, color="gray", linestyle="--", linewidth=0.8)
        axes[0][1].set_ylabel("samples/s / open_clip's (same rounds)")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("global batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench(args) -> dict:
    cfg = load_config(args.config, args.overrides)
    if args.openclip:
        if env_rank_world()[1] > 1:
            raise ConfigError("--openclip runs in a world of 1 (drop torchrun)")
        if cfg.engine.precision == "fp16":
            raise ConfigError("--openclip: engine.precision=fp16 is not supported (needs a GradScaler); use bf16")
        openclip_model_cfg(cfg.model)  # fail on an unsupported model before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_info = init_distributed(cfg.engine.dist_timeout_s)
    device, world = dist_info.device, dist_info.world_size
    for b in args.batch_sizes:
        if b % world:
            raise ConfigError(f"--batch-sizes: {b} is not divisible by the world size {world}")
    meter = MemoryMeter(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    peak = peak_tflops(device, cfg.engine.precision)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = [
        f"# bench_train {args.config} {' '.join(args.overrides)}".rstrip(),
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}; device {device.type} ({device_name}); "
        f"world {world}; torch threads {torch.get_num_threads()}; precision {cfg.engine.precision}; "
        f"ZeRO {cfg.engine.zero_stage}" + (f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""),
        f"warmup {args.warmup}, timed {args.steps} steps each (median; interleaved); synthetic batches already "
        f"on the device: data loader not measured",
        f"peak memory: {meter.kind}, above the phase start" + (", rank 0" if world > 1 else ""),
    ]
    print0("\n".join(header))
    sweep = []
    for batch_size in args.batch_sizes or [cfg.train.batch_size]:
        cfg.train.batch_size = batch_size
        results = compare(cfg, args, device, world, dist_info.rank, meter)
        flops = train_flops_per_sample(cfg.model, batch_size)
        table = format_table(results, batch_size, flops, peak)
        peak_txt = f"{peak:g} TFLOP/s" if peak else "n/a (MFU n/a)"
        executed = train_flops_per_sample(cfg.model, batch_size, pooled=True)
        lines = ["", f"global batch {batch_size} ({batch_size // world} per rank); model FLOPs per sample (train) "
                 f"{flops / 1e9:.3f} GFLOP (our model executes {executed / 1e9:.3f}: pooled last block); "
                 f"peak {peak_txt}", "", table]  # fmt: skip
        ours = results[0]
        for r in results[1:]:
            if r.impl.startswith("open_clip") and r.impl != "open_clip":
                continue
            ref = next((o for o in results if o.impl == "open_clip"), None)
            if r.impl == "open_clip":
                lines.append(f"\nratio ours/openclip: samples/s {r.median_step_s() / ours.median_step_s():.3f}, "
                             f"peak memory {ours.peak_mem_bytes / max(1, r.peak_mem_bytes):.3f}")  # fmt: skip
                if ours.num_params == r.num_params:
                    note = "equal; logit_scale is (1,) in ours (DeepSpeed cannot broadcast 0-dim) and () in open_clip"
                else:
                    note = f"differ by {ours.num_params - r.num_params:+,}: see openclip_model_cfg"
                lines.append(f"params: ours {ours.num_params:,}, open_clip {r.num_params:,} ({note})")
            elif ref is not None:
                lines.append(f"ratio {r.impl} / open_clip: samples/s {ref.median_step_s() / r.median_step_s():.3f}")
        if args.breakdown:
            lines += ["", format_breakdown(results)]
        print0("\n".join(lines))
        sweep.append({
            "batch_size": batch_size,
            "flops_per_sample": flops,
            "table": table,
            "results": [
                {
                    "impl": r.impl,
                    "num_params": r.num_params,
                    "samples_per_s": batch_size / r.median_step_s(),
                    "step_ms": r.median_step_s() * 1e3,
                    "peak_mem_bytes": r.peak_mem_bytes,
                    **({"breakdown_ms": r.breakdown.medians_ms()} if args.breakdown else {}),
                }
                for r in results
            ],
        })  # fmt: skip
    out = {**sweep[-1], "peak_tflops": peak, "memory_kind": meter.kind, "sweep": sweep, "header": header}
    if args.plot and dist_info.is_main:
        title = f"{' '.join([args.config, *args.overrides])}, {device_name}, {torch.get_num_threads()} threads"
        write_plot(args.plot, sweep, title)
        print0(f"wrote {args.plot}")
    if args.json and dist_info.is_main:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return bench(args)
    except (ConfigError, ValueError) as e:
        if env_rank_world()[0] == 0:
            print(f"bench_train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        destroy()


if __name__ == "__main__":
    main()
