"""Run planner: memory per GPU, bytes per step of every collective, a predicted step time, and a recommendation.

``python tools/plan_run.py --model ViT-L-14 --global-batch 32768 --gpus 512 --gpu-mem-gib 80`` prints a plan; the
model is here. Everything is counted from the real parameter list (the model built on the meta device: no memory)
and from what DeepSpeed 0.19.8 does with the engine config mmpretrain.engine writes; the rules below were read off
counted collectives and the allocator's peak (tests/distributed/test_plan.py checks them on 2 gloo ranks).

Legend: P parameters, W data-parallel ranks (GPUs), B global batch, b micro-batch per GPU, D embedding width,
e_w bytes of a weight / gradient element (2 under bf16 weights, else 4).

Collectives of one optimizer step, per rank, in the bytes of the buffer each call sees (all-reduce: the tensor;
all-gather: its output; reduce-scatter: its input)::

    loss (CLIP)    all-gather texts B x D fp32 (features are fp32 under every precision), all-reduce (B + 1) fp64
                   column sums + loss, reduce-scatter the text gradients B x D fp32 in backward (SigLIP: one
                   fp64 in the all-reduce)
    step flags     all-reduce (2 + [norm] + 1 + terms) fp32: TrainStep's one collective
    ZeRO 0         all-reduce of the gradients, P x e_w (DeepSpeed's flat buckets)
    ZeRO 1 / 2     all-reduce of the gradients, P x e_w (DeepSpeed 0.19.8 reduces whole buckets, then keeps its
                   partition), all-gather of the updated weights per optimizer group, each group padded to a
                   multiple of 2 W elements; two fp32 scalars (gradient norm, overflow)
    ZeRO 3         all-gather of the weights, each parameter padded to a multiple of W elements; once a step
                   while P <= stage3_max_live_parameters (our engine config: 1e9, so the backward reuses the
                   forward's gather), else twice (forward and backward); reduce-scatter of the gradients (same
                   padding); two fp64 scalars
    amp_bf16       DeepSpeed's torch_autocast moves the parameters of Linear / Conv modules (its "lower
                   precision safe modules") in bf16 at ZeRO 1-3: their gradients in the ZeRO 1/2 all-reduce, their
                   weights and gradients in ZeRO 3's all-gather and reduce-scatter; the rest stays fp32

Wire bytes (what the interconnect carries per GPU, ring algorithms): all-reduce 2 (W-1)/W, all-gather and
reduce-scatter (W-1)/W of those buffer bytes.

Memory per GPU: persistent (weights, fp32 master copy, AdamW's two moments, DeepSpeed's gradient buffers) plus
the larger of two moments of the step: the end of the forward (activations, the loss's buffers, ZeRO-3's gathered
weights) and the end of the backward (gradients, DeepSpeed's reduce bucket: 5e8 elements at ZeRO 1-3, a second
one for amp_bf16's bf16 gradients (5e8 x 4 bytes at ZeRO 1/2, x 2 at ZeRO 3, as measured), the flat all-reduce copy
at ZeRO 0 on more than one rank). Activations are what autograd saves per token of each block::

    fp32            (9 D + 2 F) x 4 bytes: LN input and output, QKV, attention output and its reshaped copy,
                    the residual, LN2 output, MLP hidden before and after the activation (F = mlp_dim)
    bf16, amp_bf16  22 D + 4 F bytes: the same in bf16 but the two LayerNorm inputs in fp32 (LayerNorm runs in
                    fp32); amp_bf16 adds autocast's bf16 copies of the matmul weights (2 bytes each)
    last block      the pooled token only: LN1 in/out and K, V for every token
    checkpointing   each block's input only, plus one block recomputed in the backward

Compiled blocks (torch.compile) save less (fused LayerNorm and GELU): the prediction is an upper bound there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmpretrain.engine import deepspeed_config
from mmpretrain.engine_config import EngineConfig, OptimConfig
from mmpretrain.model import build_model, param_groups
from mmpretrain.model.config import ModelConfig, resolve_model_config

GIB = 2**30
SAFE_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # DeepSpeed's torch_autocast
REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default (elements): ZeRO 1-3's gradient bucket
ADAM_BYTES = 8  # two fp32 moments per parameter
# Measured train step rates on one H200 (docs/benchmarks.md, 2026-12-04): (model, precision) -> samples/s/GPU
MEASURED_RATES = {("ViT-B-16", "amp_bf16"): 2244.0, ("ViT-L-14", "bf16"): 605.0}
# Those rates are of compiled blocks; under ZeRO 3 engine.compile (auto) leaves them eager. Our eager rate was not
# measured: OpenCLIP's eager / compiled ratio on the same H200 (1872 / 2745 samples/s, ViT-B/16) stands in for it.
EAGER_FACTOR = 1872.0 / 2745.0


@dataclass
class Params:
    """The model's trainable parameters, as DeepSpeed partitions them."""

    total: int  # P
    sizes: list  # numel of each parameter
    groups: list  # numel of each optimizer group (decayed, not decayed)
    matmul: int  # parameters of 2-D weights (autocast copies them to bf16)
    safe: list  # per parameter: whether it belongs to a Linear / Conv module (DeepSpeed's autocast moves it in bf16)


@dataclass
class Collective:
    name: str  # what it carries
    op: str  # all_reduce | all_gather | reduce_scatter
    bytes: int  # buffer bytes per rank and step (see the module docstring)
    calls: int = 1

    def wire_bytes(self, world: int) -> float:
        if world == 1:
            return 0.0
        share = (world - 1) / world
        return self.bytes * share * (2 if self.op == "all_reduce" else 1)


@dataclass
class Plan:
    model: str
    global_batch: int
    gpus: int
    micro_batch: int
    accum: int
    zero_stage: int
    precision: str
    grad_ckpt: bool
    params: int
    memory: dict  # name -> bytes per GPU (the peak's parts)
    peak: int  # bytes per GPU
    collectives: list = field(default_factory=list)
    compute_s: float = 0.0
    comm_s: float = 0.0
    rate: float = 0.0  # samples/s per GPU the compute time assumes

    @property
    def step_s(self) -> float:
        """No overlap of communication with compute: an upper bound (ZeRO overlaps part of it)."""
        return self.compute_s + self.comm_s


def count_params(model_cfg: ModelConfig) -> Params:
    """The parameter list of the real model, built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    groups = [sum(p.numel() for p in g["params"]) for g in param_groups(model, 0.1)]
    matmul = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dim() == 2)
    safe_ids = {id(p) for m in model.modules() if isinstance(m, SAFE_MODULES) for p in m.parameters(recurse=False)}
    safe = [id(p) in safe_ids for p in model.parameters() if p.requires_grad]
    return Params(total=sum(sizes), sizes=sizes, groups=groups, matmul=matmul, safe=safe)


def grad_bytes(params: Params, precision: str, stage: int, sizes: list | None = None) -> int:
    """Bytes of the given parameter sizes (default: each parameter's numel) in the dtype ZeRO communicates."""
    sizes = params.sizes if sizes is None else sizes
    if precision in ("bf16", "fp16"):
        return 2 * sum(sizes)
    if precision == "amp_bf16" and stage >= 1:
        return sum(n * (2 if safe else 4) for n, safe in zip(sizes, params.safe))
    return 4 * sum(sizes)


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def weight_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def owns_clipping(stage: int, precision: str) -> bool:
    return stage == 0 and precision in ("fp32", "amp_bf16")


def collectives(params: Params, *, world: int, stage: int, precision: str, global_batch: int, embed_dim: int,
                family: str = "clip", num_terms: int = 1, max_live: float = 1e9) -> list:  # fmt: skip
    """Every collective of one steady-state optimizer step on one rank (none in a world of one)."""
    if world == 1:
        return []
    e_w, e_f = weight_bytes(precision), 4
    B, D = global_batch, embed_dim
    out = [
        Collective("loss: all-gather texts", "all_gather", B * D * e_f),
        Collective("loss: column sums + loss (fp64)", "all_reduce", (B + 1 if family == "clip" else 1) * 8),
        Collective("loss: reduce-scatter text grads", "reduce_scatter", B * D * e_f),
        Collective("step flags", "all_reduce", (3 + int(owns_clipping(stage, precision)) + num_terms) * 4),
    ]
    if stage == 0:
        out.append(Collective("gradients: all-reduce", "all_reduce", params.total * e_w))
    elif stage in (1, 2):
        out.append(Collective("gradients: all-reduce", "all_reduce", grad_bytes(params, precision, stage)))
        padded = [_pad(n, 2 * world) for n in params.groups if n]
        out.append(Collective("weights: all-gather", "all_gather", sum(padded) * e_w, calls=len(padded)))
        out.append(Collective("DeepSpeed norm / overflow (fp32)", "all_reduce", 2 * 4, calls=2))
    else:
        padded = grad_bytes(params, precision, stage, [_pad(n, world) for n in params.sizes])
        passes = 1 if params.total <= max_live else 2
        out.append(Collective("weights: all-gather", "all_gather", passes * padded, calls=passes))
        out.append(Collective("gradients: reduce-scatter", "reduce_scatter", padded))
        out.append(Collective("DeepSpeed norm / overflow (fp64)", "all_reduce", 2 * 8, calls=2))
    return out


def op_totals(colls: list) -> dict:
    """{op: bytes} over a step's collectives: what the test compares with torch.distributed's counted calls."""
    totals: dict = {}
    for c in colls:
        totals[c.op] = totals.get(c.op, 0) + c.bytes
    return totals


def _tower_tokens(model_cfg: ModelConfig) -> dict:
    v, t = model_cfg.vision, model_cfg.text
    patches = (v.image_size // v.patch_size) ** 2
    keep = patches - int(patches * v.patch_dropout)
    return {"vision": (keep + (1 if model_cfg.family == "clip" else 0), v), "text": (t.context_length, t)}


def activation_bytes(model_cfg: ModelConfig, micro_batch: int, precision: str, grad_ckpt: bool) -> dict:
    """{tower: bytes autograd keeps for the backward} of one micro-batch (see the module docstring)."""
    res = 2 if precision in ("bf16", "fp16") else 4  # the residual stream's dtype
    out = {}
    for name, (n, c) in _tower_tokens(model_cfg).items():
        T = micro_batch * n
        W, F = c.width, c.mlp_dim
        block = (9 * W + 2 * F) * 4 if precision == "fp32" else 22 * W + 4 * F
        lse = micro_batch * c.heads * n * 4  # attention's log-sum-exp per query
        last = (5 * W * 4 if precision == "fp32" else 12 * W) * T
        embed = 2 * T * W * res  # embedding output and the first LayerNorm's input
        if name == "vision":
            embed += micro_batch * 3 * c.image_size**2 * res
        if grad_ckpt:
            out[name] = embed + c.layers * T * W * res + T * block + lse
        else:
            out[name] = embed + (c.layers - 1) * (T * block + lse) + last + lse
    return out


def memory(params: Params, model_cfg: ModelConfig, *, world: int, stage: int, precision: str, micro_batch: int,
           global_batch: int, grad_ckpt: bool, max_live: float = 1e9) -> tuple[dict, int]:  # fmt: skip
    """(parts in bytes per GPU, peak bytes per GPU)."""
    P, e = params.total, weight_bytes(precision)
    shard = world if stage >= 1 else 1
    persistent = {
        "weights": P * e if stage < 3 else _pad(P, world) * e // world,
        "adam moments": ADAM_BYTES * P // shard,
    }
    if precision in ("bf16", "fp16"):
        persistent["fp32 master weights"] = 4 * P // shard
        if stage == 0:
            persistent["fp32 gradient accumulation"] = 4 * P
    elif stage >= 1:
        persistent["fp32 weight partition"] = 4 * P // world
    if stage >= 1:
        persistent["gradient partition"] = 4 * P // world
    if stage == 1:
        persistent["gradients"] = P * e
    acts = activation_bytes(model_cfg, micro_batch, precision, grad_ckpt)
    forward = {f"activations: {k}": v for k, v in acts.items()}
    if precision == "amp_bf16":
        forward["autocast bf16 weight copies"] = 2 * params.matmul
    D = model_cfg.embed_dim
    # the tiled loss keeps the gathered texts and their gradient (B x D fp32 each) and B fp64 column sums
    forward["loss buffers"] = 2 * global_batch * D * 4 + 16 * global_batch
    backward = {}
    if stage == 0:
        backward["gradients"] = P * e
        if world > 1:
            backward["all-reduce flat copy"] = P * e
    else:
        backward["reduce bucket"] = REDUCE_BUCKET * e
        if precision == "amp_bf16":
            backward["reduce bucket, bf16 gradients"] = REDUCE_BUCKET * (2 if stage == 3 else 4)
        if stage == 1:
            backward["all-reduce flat copy"] = P * e
    if stage == 3:
        # the gathered weights stay for the backward while P <= max_live
        gathered = int(grad_bytes(params, precision, stage) * min(1.0, max_live / P))
        forward["ZeRO-3 gathered weights"] = gathered
        backward["ZeRO-3 gathered weights"] = gathered
    moment = forward if sum(forward.values()) >= sum(backward.values()) else backward
    parts = {**persistent, **moment}
    return parts, sum(parts.values())


def flops_per_sample(model_cfg: ModelConfig) -> float:
    """Training FLOPs of one sample (weight matmuls and attention, 3x forward): only to scale a measured rate."""
    total = 0.0
    for n, c in _tower_tokens(model_cfg).values():
        total += 6 * n * c.layers * (4 * c.width**2 + 2 * c.width * c.mlp_dim) + 12 * c.layers * n * n * c.width
    return total


def default_rate(model_name: str, model_cfg: ModelConfig, precision: str) -> float:
    """samples/s per GPU: the measured one, else ViT-B-16's scaled by FLOPs per sample."""
    if (model_name, precision) in MEASURED_RATES:
        return MEASURED_RATES[(model_name, precision)]
    ref = resolve_model_config(ModelConfig(name="ViT-B-16"))
    return MEASURED_RATES[("ViT-B-16", "amp_bf16")] * flops_per_sample(ref) / flops_per_sample(model_cfg)


def plan(model_name: str, *, global_batch: int, gpus: int, zero_stage: int, precision: str = "amp_bf16",
         grad_ckpt: bool = False, micro_batch: int | None = None, rate: float | None = None,
         bandwidth_gbs: float = 50.0, num_terms: int = 1) -> Plan:  # fmt: skip
    """One configuration's plan. bandwidth_gbs: interconnect GB/s per GPU (bus bandwidth of the slowest link)."""
    if global_batch % gpus:
        raise ValueError(f"--global-batch must be divisible by --gpus (got {global_batch} on {gpus})")
    per_gpu = global_batch // gpus
    micro = micro_batch or per_gpu
    if per_gpu % micro:
        raise ValueError(f"the per-GPU batch {per_gpu} must be divisible by --micro-batch {micro}")
    model_cfg = resolve_model_config(ModelConfig(name=model_name, grad_checkpointing=grad_ckpt))
    ds = deepspeed_config(EngineConfig(zero_stage=zero_stage, precision=precision), OptimConfig(), micro)
    max_live = ds["zero_optimization"].get("stage3_max_live_parameters", 1e9)
    params = count_params(model_cfg)
    parts, peak = memory(params, model_cfg, world=gpus, stage=zero_stage, precision=precision, micro_batch=micro,
                         global_batch=global_batch, grad_ckpt=grad_ckpt, max_live=max_live)  # fmt: skip
    colls = collectives(params, world=gpus, stage=zero_stage, precision=precision, global_batch=global_batch,
                        embed_dim=model_cfg.embed_dim, family=model_cfg.family, num_terms=num_terms,
                        max_live=max_live)  # fmt: skip
    accum = per_gpu // micro
    if accum > 1:  # GradCache runs each micro-batch's forward twice (features, then with the backward): not validated
        for c in colls:
            if c.name.startswith("weights: all-gather") and zero_stage == 3:
                c.bytes *= 2 * accum
    r = (rate or default_rate(model_name, model_cfg, precision)) * (EAGER_FACTOR if zero_stage == 3 else 1.0)
    compute = per_gpu / r * (1.33 if grad_ckpt else 1.0) * (1 + (1 / 3 if accum > 1 else 0))
    comm = sum(c.wire_bytes(gpus) for c in colls) / (bandwidth_gbs * 1e9)
    return Plan(model_name, global_batch, gpus, micro, accum, zero_stage, precision, grad_ckpt, params.total, parts,
                peak, colls, compute, comm, r)  # fmt: skip


def recommend(model_name: str, *, global_batch: int, gpus: int, gpu_mem_gib: float, precision: str = "amp_bf16",
              bandwidth_gbs: float = 50.0, rate: float | None = None, headroom: float = 0.9) -> list:  # fmt: skip
    """Every (stage, checkpointing, micro-batch) that fits headroom x the GPU's memory, fastest first."""
    per_gpu = global_batch // gpus
    micros = [m for m in (2**i for i in range(16)) if m <= per_gpu and per_gpu % m == 0] or [per_gpu]
    fits = []
    for stage in (0, 1, 2, 3):
        for ckpt in (False, True):
            for micro in sorted(micros, reverse=True):
                p = plan(model_name, global_batch=global_batch, gpus=gpus, zero_stage=stage, precision=precision,
                         grad_ckpt=ckpt, micro_batch=micro, rate=rate, bandwidth_gbs=bandwidth_gbs)  # fmt: skip
                if p.peak <= headroom * gpu_mem_gib * GIB:
                    fits.append(p)
                    break  # the largest micro-batch that fits
    return sorted(fits, key=lambda p: (round(p.step_s, 4), p.zero_stage, p.grad_ckpt))


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:9.2f} {unit}"
    return f"{n:9.0f} B "


def format_plan(p: Plan, gpu_mem_gib: float | None = None) -> str:
    lines = [f"{p.model} ({p.params:,} parameters), global batch {p.global_batch} on {p.gpus} GPUs: "
             f"ZeRO {p.zero_stage}, {p.precision}, activation checkpointing {'on' if p.grad_ckpt else 'off'}, "
             f"micro-batch {p.micro_batch} x {p.accum} accumulation (GradCache)"]  # fmt: skip
    lines.append("memory per GPU at the peak:")
    lines += [f"  {name:34s} {_gib(n)}" for name, n in p.memory.items()]
    fit = f" of {gpu_mem_gib:g} GiB" + (" (does not fit)" if gpu_mem_gib and p.peak > gpu_mem_gib * GIB else "")
    lines.append(f"  {'total':34s} {_gib(p.peak)}{fit if gpu_mem_gib else ''}")
    lines.append("collectives per step and GPU (buffer bytes; wire bytes for ring algorithms):")
    for c in p.collectives:
        lines.append(
            f"  {c.name:34s} {c.op:15s} x{c.calls:<3d} {_bytes(c.bytes)}   wire {_bytes(c.wire_bytes(p.gpus))}"
        )
    if not p.collectives:
        lines.append("  none (one GPU)")
    lines.append(f"step time: compute {p.compute_s * 1e3:.1f} ms ({p.global_batch // p.gpus} samples at "
                 f"{p.rate:.0f} samples/s/GPU) + communication {p.comm_s * 1e3:.1f} ms = {p.step_s * 1e3:.1f} ms "
                 f"(no overlap: an upper bound) -> {p.global_batch / p.step_s:,.0f} samples/s")  # fmt: skip
    return "\n".join(lines)


def format_recommendation(fits: list, gpu_mem_gib: float) -> str:
    if not fits:
        return f"nothing fits in {gpu_mem_gib:g} GiB: add GPUs or lower the global batch"
    lines = [f"configurations that fit in 90% of {gpu_mem_gib:g} GiB, fastest first:",
             "  stage  ckpt  micro x accum   peak GiB   step ms   samples/s"]  # fmt: skip
    for p in fits:
        lines.append(f"  {p.zero_stage:5d}  {'on ' if p.grad_ckpt else 'off'}   {p.micro_batch:5d} x {p.accum:<5d}"
                     f"  {p.peak / GIB:9.1f}  {p.step_s * 1e3:8.1f}  {p.global_batch / p.step_s:10,.0f}")  # fmt: skip
    best = fits[0]
    lines.append(
        f"recommended: engine.zero_stage={best.zero_stage} model.grad_checkpointing="
        f"{str(best.grad_ckpt).lower()} train.accum_steps={best.accum} (micro-batch {best.micro_batch})"
    )
    return "\n".join(lines)
