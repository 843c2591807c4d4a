"""One optimizer step on this rank's batch: ``TrainStep(engine, objective, ...)(batch, step, stop_requested)``.

    forward (both towers; the objective's heads and token states as its terms ask)
    -> the objective: sum of weight x term over the global batch (collectives inside the loss kernels)
    -> backward (DeepSpeed averages gradients over ranks)
    -> [ZeRO 0, fp32 / amp_bf16] clip; the global gradient norm, still on the device
    -> ONE collective + ONE device-to-host copy: non-finite?, stop requested?, the norm, the logged values
    -> skip (gradients dropped) or optimizer step

Host-device syncs: one per step (the ``tolist`` of the flags) where the trainer owns clipping (ZeRO 0 with fp32 or
amp_bf16 weights, the fast path on GPUs): the gradient norm is computed on the device, folded into the flags, and
a non-finite gradient shows as a non-finite norm, so no per-parameter hook or check runs in the step. Elsewhere
DeepSpeed clips inside its optimizer step (ZeRO 1-3, or bf16/fp16 weights): gradients there are reduced or
partitioned inside DeepSpeed, so the StepGuard's gradient hooks note non-finite values as backward produces them,
and the logged norm is the one DeepSpeed computed during its step.

``train.accum_steps`` > 1 runs the GradCache step (mmpretrain.loss.grad_cache_step): every negative kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmpretrain.data.transforms import normalize_images
from mmpretrain.distributed import all_reduce, world_rank
from mmpretrain.engine import input_dtype, owns_clipping
from mmpretrain.faults import Injector, StepGuard, discard_gradients
from mmpretrain.loss import grad_cache_step
from mmpretrain.objectives import Objective, StepContext


@dataclass
class StepResult:
    loss: torch.Tensor  # global-batch loss: the summed terms, mean over ranks (the same on every rank), on the host
    grad_norm: float | None  # before clipping; None for a skipped step
    logit_scale: torch.Tensor
    skipped: bool  # the loss or a gradient was non-finite on some rank: no optimizer step
    stop: bool  # some rank was asked to stop (signal or stop file)
    terms: dict  # {term name: unweighted value, mean over ranks} (floats)


class TrainStep:
    """The step of a run, built once: the engine, the objective and the few settings a step reads.

    ``engine``: the DeepSpeed engine of build_engine (or anything with its interface: __call__, backward, step,
    zero_grad, zero_optimization_stage, gradient_clipping, get_global_grad_norm, module).
    ``injector``: test faults (mmpretrain.faults.Injector), inert by default.
    """

    def __init__(self, engine, objective: Objective, engine_cfg, *, accum_steps: int = 1, grad_clip: float = 0.0,
                 loss_cfg=None, device: torch.device | None = None, injector: Injector | None = None):  # fmt: skip
        self.engine, self.objective, self.loss_cfg = engine, objective, loss_cfg
        self.accum_steps, self.grad_clip = accum_steps, grad_clip
        self.dtype = input_dtype(engine_cfg)
        self.device = device or torch.device("cpu")
        self.injector = injector or Injector(None, rank=0)
        self.world, _ = world_rank()
        # we clip and take the norm (whole, averaged gradients in param.grad) where DeepSpeed does not
        self.norm_here = owns_clipping(engine_cfg) and engine.zero_optimization_stage() == 0
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.before_update = None  # called before each optimizer update (a background save's copy must finish first)
        self.guard = None
        if not self.norm_here:
            self.guard = StepGuard(engine.module, self.device, self.injector)
        elif self.injector.has("nan_grad"):
            self.params[0].register_hook(self.injector.grad_hook)  # tests: a NaN the norm must catch

    def __call__(self, batch: dict, step: int = 0, stop_requested: bool = False) -> StepResult:
        """One optimizer step on this rank's batch, or none if any rank saw a non-finite loss or gradient.
        Every rank decides alike (one collective)."""
        images = normalize_images(batch["image"].to(self.device, non_blocking=True), self.dtype)  # (b, 3, H, W)
        tokens = batch["text"].to(self.device, non_blocking=True)  # (b, L)
        if self.guard is not None:
            self.guard.reset()
        if self.accum_steps > 1:
            loss, values, logit_scale = self._grad_cache(images, tokens, batch, step)
        else:
            out = self.engine(images, tokens, **self.objective.forward_kwargs())
            ctx = StepContext(out, images, tokens, batch, self.engine, None, self.loss_cfg, step)  # group None: world
            loss, values = self.objective(ctx)  # over the global batch, the same value on every rank
            loss = self.injector.loss(loss)
            self.engine.backward(loss)
            logit_scale = out.logit_scale.detach()
        bad = ~torch.isfinite(loss.detach()).all()
        if self.guard is not None:
            bad = bad | self.guard.bad
        norm = self._norm_and_clip() if self.norm_here else None
        if norm is not None:
            bad = bad | ~torch.isfinite(norm)  # a NaN or inf in any gradient makes the global norm non-finite
        names = list(values)
        # values / world, summed over ranks: the mean over ranks (a per-rank term such as MIM differs between ranks);
        # the norm is the same on every rank (ZeRO 0: averaged gradients), so its mean is itself
        means = [
            t.detach().float().reshape(()).to(bad.device) / self.world for t in (loss, *(values[n] for n in names))
        ]
        extra = [norm.detach().float().reshape(()) / self.world] if norm is not None else []
        flags = torch.stack([bad.float(), torch.tensor(float(stop_requested), device=bad.device), *extra, *means])
        all_reduce(flags)  # the one collective of the step: every rank decides alike (sum; none on one rank)
        flags = flags.tolist()  # the one device-to-host copy: every decision and logged value of the step
        skipped, stop = flags[0] > 0, flags[1] > 0
        grad_norm = flags[2] if norm is not None else None
        rest = flags[2 + len(extra) :]
        mean_loss = torch.tensor(rest[0])  # on the host: the loop's .item() costs no further sync
        terms = dict(zip(names, rest[1:]))
        if skipped:
            discard_gradients(self.engine)
            return StepResult(mean_loss, None, logit_scale, True, stop, terms)
        if self.before_update is not None:
            self.before_update()
        self.engine.step()
        self.objective.after_step(self.engine, step)  # e.g. self_distill's EMA teacher follows the new weights
        if grad_norm is None:
            dnorm = self.engine.get_global_grad_norm()  # DeepSpeed's, computed in its step
            grad_norm = None if dnorm is None else float(dnorm)
        return StepResult(mean_loss, grad_norm, logit_scale, False, stop, terms)

    def _norm_and_clip(self) -> torch.Tensor:
        """Global L2 norm of the gradients before clipping, as a device tensor; clips in place to grad_clip."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        if self.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # foreach kernels, no host sync
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def _grad_cache(self, images, tokens, batch, step):
        engine, k = self.engine, self.accum_steps

        def backward(surrogate, last):
            engine.set_gradient_accumulation_boundary(last)  # ZeRO-0/1/2 reduce once, after the last
            engine.backward(surrogate)

        micro = list(zip(images.chunk(k), tokens.chunk(k)))
        scales, gc_values = [], {}

        def forward(mb):
            out = engine(*mb)
            scales.append(out.logit_scale.detach())
            return out

        def loss_fn(features):  # the concatenated features of all micro-batches (one contrastive term)
            total, vals = self.objective(StepContext(features, None, None, batch, engine, None, self.loss_cfg, step))
            gc_values.update(vals)
            return self.injector.loss(total)

        loss = grad_cache_step(forward, micro, loss_fn, backward)
        return loss, {n: v.detach() for n, v in gc_values.items()}, scales[-1]
