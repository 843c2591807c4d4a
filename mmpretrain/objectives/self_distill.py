"""SigLIP 2's self-distillation (SILC) and masked prediction (TIPS) against an EMA teacher of the vision tower.

    data:
      train: {local_crops: 2}               # the loader's transform adds the student's local views
    loss:
      terms:
        siglip: {weight: 1.0}
        self_distill: {weight: 1.0, start_fraction: 0.8, prototypes: 1024}

SigLIP 2 (Tschannen et al. 2025, arXiv 2502.14786, Sec. 2.3) adds, for the last 20% of training, SILC's
local-to-global consistency (Naeem et al. 2023: the student sees local crops, an EMA teacher the global view)
and TIPS' masked prediction (Maninis et al. 2024, after iBOT: the student's patches are partly replaced by a mask
token and it predicts the teacher's per-patch output at the masked positions; the teacher sees the whole image).
Both are DINO/iBOT-style self-distillation through projection heads to K prototypes:

    teacher  p = softmax((h_t - c) / teacher_temp)     (c: the center, an EMA of the teacher's global-batch mean)
    student  log q = log_softmax(h_s / student_temp)
    loss     -sum_k p_k log q_k, averaged
    SILC     h_t = G_t(teacher(global view).embeds), h_s = G(student(local crop j).embeds): mean over b x n crops
    TIPS     h_t = P_t(teacher(global view).tokens[p]), h_s = P(student(masked view).tokens[p]): mean over the
             b x M masked patches
    term     silc_weight x SILC + tips_weight x TIPS

G and P (``model.heads["self_distill"]``: global_proj, patch_proj) are DINO's head: Linear-GELU-Linear, L2
normalization, a bias-free Linear to K (no weight normalization); the teacher has its own copies (G_t, P_t), EMAs
of the student's like its tower. The center (one for SILC, one for TIPS) moves after each optimizer step:
c <- center_momentum c + (1 - center_momentum) mean, the mean of the teacher's outputs over the global batch (all
patches for TIPS), one all-reduce of 2K numbers. The centers start at the means of the first batch the term
sees (DINO starts them at 0: then the first targets are the sharpest of the run, and on the tiny twin the loss
climbed towards log K for 20 steps while the centers caught up, a transient that says nothing of the student).

The views. The global view is the train crop (``ctx.images``). The local crops come from the loader
(``data.train.local_crops``, ``batch["local_crops"]``: RandomResizedCrops of ``data.train.local_crop_scale``,
seeded per sample like the train crop), at the model's image size: our towers take one size (learned position
embeddings), so a local crop costs a full forward, where DINO and SILC shrink them to 96 px. The mask: the same
number of patches M = P - max(1, int(P (1 - mask_ratio))) in every image, drawn for the global batch from
objectives.base.step_generator (train.seed, step, stream 2), so N ranks mask what one rank holding the batch does.
The mask token is a learned patch of (normalized) pixels put in place of each masked patch before the tower: the
patch embedding is linear, so its embedding W m + b is a learned token (any vector while the width is at most
3 x patch_size^2, true of every ViT here), and the position embedding is added as to any patch. This keeps the
vision tower untouched (NaFlex reshapes it).

The teacher. A copy of the vision tower and of both projections, in fp32, outside the DeepSpeed engine (never
sharded, never in the optimizer), without gradients and in eval mode; copied from the student at the first step
the term is on, then after each optimizer step (not after a skipped one) ``t <- m t + (1 - m) s`` with m going
from ``momentum`` to ``momentum_end`` along a half cosine over the remaining steps: fixed by default (SILC: a
momentum that reaches 1 stops the teacher following the image-text loss late in training), DINO's schedule with
``momentum_end: 1``. Under ZeRO-3 the student's
parameters are partitioned: they are gathered (mmpretrain.distributed.gathered_params, an all-gather of the tower
per step, as a forward costs) and every rank holds the same whole teacher. We chose a whole fp32 copy over a
teacher partitioned like the student: its forward needs whole weights anyway, an EMA in bf16 would lose updates of
size (1 - m) ~ 1e-3 to rounding, and one whole teacher saves the same on any world size (a vision tower's fp32
weights per rank: 0.35 GB for ViT-B). The teacher, its centers and whether it started are the term's state:
each checkpoint holds them (``objective_state.pt``, written by rank 0: the ranks' copies are equal) and a resume
restores them exactly (mmpretrain.checkpoint).

``start_fraction``: the term is off (a zero loss, no tower forward, no teacher) for the first start_fraction x
train.steps steps and on after (SigLIP 2: 0.8). While off, the heads get an exact-zero gradient (a forward of
zeros times 0): DeepSpeed zero-fills a missing gradient on several ranks or under ZeRO but not on one ZeRO-0 rank,
so AdamW (weight decay, step count) would otherwise treat the heads differently on 1 and N ranks.

Gradient contract: a local term (the mean over this rank's crops and masked patches, the same count on every
rank); only the center and the mask involve the global batch, neither with a gradient. The student's extra
forwards call the vision tower directly (ZeRO-3's hooks gather its layers as in the engine's forward), under
torch.autocast where the engine runs amp_bf16.

Shapes: b local batch, G global batch, n local crops, P patches, M masked patches per image, D vision width,
E embedding width (= D for SigLIP), W head width, K prototypes, X = 3 x patch_size^2.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.data.transforms import normalize_images
from mmpretrain.distributed import all_reduce, gathered_params, world_rank
from mmpretrain.model import build_model, resolve_model_config
from mmpretrain.objectives.base import StepContext, Term, register, step_generator
from mmpretrain.objectives.config import SelfDistillTermConfig, num_kept


class ProjectionHead(nn.Module):
    """DINO's head without weight normalization: (..., D) -> (..., K) prototype scores."""

    def __init__(self, dim: int, width: int, prototypes: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, width)
        self.fc2 = nn.Linear(width, width)
        self.prototypes = nn.Linear(width, prototypes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(self.fc2(F.gelu(self.fc1(x))), dim=-1)
        return self.prototypes(h)


class SelfDistillHeads(nn.Module):
    """The student's trainable parts: both projections and the mask patch; run as ``model(head=..., op=...)``."""

    def __init__(self, embed_dim: int, vision_width: int, width: int, prototypes: int, patch_size: int):
        super().__init__()
        self.global_proj = ProjectionHead(embed_dim, width, prototypes)
        self.patch_proj = ProjectionHead(vision_width, width, prototypes)
        self.mask_patch = nn.Parameter(torch.zeros(3, patch_size, patch_size))  # normalized pixels; 0 = the mean

    def forward(self, op: str, x: torch.Tensor, mask_BP: Optional[torch.Tensor] = None,
                x_patch: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        """op "global": (..., E) -> (..., K); "patch": (..., D) -> (..., K); "mask": images (B, 3, H, W) with
        the patches where mask_BP (B, P) is True replaced by the mask patch; "zero": a 0 whose gradient reaches
        every parameter as exact zeros (x (1, E), x_patch (1, D): any input)."""
        if op == "global":
            return self.global_proj(x)
        if op == "patch":
            return self.patch_proj(x)
        if op == "zero":
            total = self.global_proj(x).sum() + self.patch_proj(x_patch).sum() + self.mask_patch.sum()
            return total.float() * 0.0 + 0.0  # + 0: logged as 0.0, not -0.0
        assert op == "mask", op
        return mask_images(x, mask_BP, self.mask_patch)


def mask_images(images_BCHW: torch.Tensor, mask_BP: torch.Tensor, patch_Cpp: torch.Tensor) -> torch.Tensor:
    """Images with each masked patch (row-major patches, as the patch embedding reads them) set to ``patch``."""
    B, C, H, W = images_BCHW.shape
    p = patch_Cpp.shape[-1]
    x = images_BCHW.reshape(B, C, H // p, p, W // p, p)
    m = mask_BP.reshape(B, 1, H // p, 1, W // p, 1)
    tok = patch_Cpp.to(images_BCHW.dtype).reshape(1, C, 1, p, 1, p)
    return torch.where(m, tok, x).reshape(B, C, H, W)


def patch_mask(seed: int, step: int, global_batch: int, num_patches: int, num_masked: int, rank: int, b: int):
    """(b, P) bool: this rank's rows of the global batch's mask, num_masked patches per image."""
    noise_GP = torch.rand(global_batch, num_patches, generator=step_generator(seed, step, stream=2))
    masked_GM = noise_GP.argsort(dim=1)[:, :num_masked]
    mask_GP = torch.zeros(global_batch, num_patches, dtype=torch.bool).scatter_(1, masked_GM, True)
    return mask_GP[rank * b : (rank + 1) * b]


def distill_ce(student_nK: torch.Tensor, teacher_nK: torch.Tensor, center_K: torch.Tensor, student_temp: float,
               teacher_temp: float) -> torch.Tensor:  # fmt: skip
    """Mean over rows of -sum_k softmax((t - c) / teacher_temp)_k log_softmax(s / student_temp)_k (fp32+)."""
    dtype = torch.promote_types(student_nK.dtype, torch.float32)
    p_nK = F.softmax((teacher_nK.to(dtype) - center_K.to(dtype)) / teacher_temp, dim=-1)
    logq_nK = F.log_softmax(student_nK.to(dtype) / student_temp, dim=-1)
    return -(p_nK * logq_nK).sum(-1).mean()


def ema_momentum(m0: float, m1: float, step: int, first: int, last: int) -> float:
    """The teacher's momentum after optimizer step ``step``: m0 at ``first``, m1 at ``last``, half a cosine between."""
    progress = (step - first) / max(1, last - first)
    return m1 - (m1 - m0) * (1.0 + math.cos(math.pi * min(1.0, progress))) / 2.0


class Teacher(nn.Module):
    """The EMA copies (vision tower, both projections) and the centers; its state_dict is the term's state."""

    def __init__(self, vision: nn.Module, global_proj: nn.Module, patch_proj: nn.Module, prototypes: int):
        super().__init__()
        self.vision, self.global_proj, self.patch_proj = vision, global_proj, patch_proj
        self.register_buffer("center_global", torch.zeros(prototypes))
        self.register_buffer("center_patch", torch.zeros(prototypes))
        self.register_buffer("started", torch.zeros((), dtype=torch.int64))  # 1 once copied from the student


def student_parts(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The student's modules the teacher copies, under the teacher's names (the engine's module or the model)."""
    module = getattr(model, "module", model)
    heads = module.heads[name]
    return {"vision": module.vision_model, "global_proj": heads.global_proj, "patch_proj": heads.patch_proj}


@register
class SelfDistillTerm(Term):
    """silc_weight x SILC + tips_weight x TIPS against the EMA teacher; zero before the start step."""

    name = "self_distill"
    config_cls = SelfDistillTermConfig

    def __init__(self, cfg: SelfDistillTermConfig, run_cfg):
        super().__init__(cfg, run_cfg)
        v = run_cfg.model.vision
        self.num_patches = (v.image_size // v.patch_size) ** 2
        self.num_masked = self.num_patches - num_kept(self.num_patches, cfg.mask_ratio)
        self.first = cfg.first_step(run_cfg.train.steps)
        self.teacher: Optional[Teacher] = None
        self.pending_centers = None  # (global (K,), patch (K,)) means of this step, applied after its update
        self.amp = run_cfg.engine.precision == "amp_bf16"
        self.embed_dim, self.vision_width = resolve_model_config(run_cfg.model).embed_dim, v.width

    def active(self, step: int) -> bool:
        return step >= self.first

    def build_head(self, model):
        c = self.cfg
        patch_size = self.run_cfg.model.vision.patch_size
        return SelfDistillHeads(self.embed_dim, self.vision_width, c.head_width, c.prototypes, patch_size)

    def setup(self, device) -> None:
        with torch.random.fork_rng(devices=[]):  # the run's random stream stays as without this term
            model = build_model(self.run_cfg.model)
            heads = self.build_head(model)
        self.teacher = Teacher(model.vision_model, heads.global_proj, heads.patch_proj, self.cfg.prototypes)
        self.teacher = self.teacher.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

    # ------------------------------------------------------------------ the term's state (checkpoints)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict(state, strict=True)
        self.pending_centers = None

    # ------------------------------------------------------------------ the teacher's updates

    @torch.no_grad()
    def _update_teacher(self, model, momentum: float) -> None:
        """t <- m t + (1 - m) s for every parameter (m = 0: a copy); under ZeRO-3 the student's are gathered."""
        for part, module in student_parts(model, self.name).items():
            params = dict(module.named_parameters())
            with gathered_params(list(params.values())):  # collective under ZeRO-3
                for name, t in getattr(self.teacher, part).named_parameters():
                    s = params[name].detach().to(device=t.device, dtype=t.dtype)
                    if momentum:
                        t.mul_(momentum).add_(s, alpha=1.0 - momentum)
                    else:
                        t.copy_(s)

    def after_step(self, model, step: int) -> None:
        """After optimizer step ``step``: the EMA of the student's new weights, then this step's centers."""
        if not self.active(step):
            return
        m = ema_momentum(self.cfg.momentum, self.cfg.momentum_end, step, self.first, self.run_cfg.train.steps)
        self._update_teacher(model, m)
        if self.pending_centers is not None:
            cm, t = self.cfg.center_momentum, self.teacher
            t.center_global.mul_(cm).add_(self.pending_centers[0], alpha=1 - cm)
            t.center_patch.mul_(cm).add_(self.pending_centers[1], alpha=1 - cm)
            self.pending_centers = None

    # ------------------------------------------------------------------ the loss

    def _student(self, model, images_BCHW: torch.Tensor):
        """The student's vision tower on extra views (all patches kept), under the engine's autocast."""
        vision = student_parts(model, self.name)["vision"]
        with torch.autocast(images_BCHW.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return vision(images_BCHW, patch_drop=0.0)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        images_BCHW = ctx.images
        if not self.active(ctx.step):
            # Off: a zero that still hands the heads a gradient (of zeros). DeepSpeed fills a missing gradient with
            # zeros on several ranks (or under ZeRO) but not on one rank under ZeRO-0, and AdamW's decay and step
            # count follow: without this, 1 rank and N ranks would drift apart from the first step on.
            zeros = images_BCHW.new_zeros(1, self.embed_dim), images_BCHW.new_zeros(1, self.vision_width)
            return ctx.model(head=self.name, op="zero", x=zeros[0], x_patch=zeros[1])
        t, c = self.teacher, self.cfg
        starting = not int(t.started)
        if starting:
            self._update_teacher(ctx.model, 0.0)  # the first step on: the teacher starts as the student
            t.started.fill_(1)
        world, rank = world_rank(ctx.group)
        b = images_BCHW.shape[0]
        with torch.no_grad():
            t_out = t.vision(images_BCHW.to(t.center_global.dtype), patch_drop=0.0)  # fp32 (fp64 in the tests)
            t_glob_bK = t.global_proj(t_out.embeds)
            t_patch_bPK = t.patch_proj(t_out.last_hidden_state)
            # the centers' next values: the teacher's mean over the global batch (applied after the optimizer step)
            sums = torch.cat([t_glob_bK.sum(0), t_patch_bPK.mean(1).sum(0)])  # the teacher's dtype: fp32
            self.pending_centers = (all_reduce(sums, group=ctx.group) / (world * b)).chunk(2)  # collective
            if starting:  # the centers start at the first batch's means (see the module docstring)
                t.center_global.copy_(self.pending_centers[0])
                t.center_patch.copy_(self.pending_centers[1])
        total = torch.zeros((), device=images_BCHW.device, dtype=torch.float32)
        if c.silc_weight:
            locals_bn = ctx.batch.get("local_crops")
            if locals_bn is None:
                raise RuntimeError("the self_distill term needs batch['local_crops']: set data.train.local_crops")
            n = locals_bn.shape[1]
            locals_nB = normalize_images(locals_bn.to(images_BCHW.device).flatten(0, 1), images_BCHW.dtype)
            s_glob = ctx.model(head=self.name, op="global", x=self._student(ctx.model, locals_nB).embeds)
            s_glob_bnK = s_glob.reshape(b, n, -1)
            t_glob_bnK = t_glob_bK[:, None].expand_as(s_glob_bnK)
            silc = distill_ce(s_glob_bnK.flatten(0, 1), t_glob_bnK.flatten(0, 1), t.center_global, c.student_temp,
                              c.teacher_temp)  # fmt: skip
            total = total + c.silc_weight * silc
        if c.tips_weight:
            mask_bP = patch_mask(self.run_cfg.train.seed, ctx.step, world * b, self.num_patches, self.num_masked,
                                 rank, b).to(images_BCHW.device)  # fmt: skip
            masked = ctx.model(head=self.name, op="mask", x=images_BCHW, mask_BP=mask_bP)
            tokens_bPD = self._student(ctx.model, masked).last_hidden_state
            s_patch_mK = ctx.model(head=self.name, op="patch", x=tokens_bPD[mask_bP])
            tips = distill_ce(s_patch_mK, t_patch_bPK[mask_bP], t.center_patch, c.student_temp, c.teacher_temp)
            total = total + c.tips_weight * tips
        return total
