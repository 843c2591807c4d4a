"""CLIP and SigLIP losses over the global batch (first version: plain torch, full matrix).

Shapes: b = local (per-rank) batch, B = global batch (b * world), D = feature dim.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSS_NAMES = ("clip", "siglip")
LOSS_IMPLS = ("auto", "triton", "chunked", "naive")


@dataclass
class LossConfig:
    """Contrastive loss; the root config composes it as ``loss``."""

    name: str = "clip"  # clip | siglip; must match the model family (the root config checks)
    impl: str = "auto"  # auto | triton | chunked | naive; auto = triton on CUDA, chunked on CPU
    chunk_size: int = 1024  # rows of the similarity matrix per chunk on the chunked torch path

    def validate(self, prefix: str) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"{prefix}.name must be one of {LOSS_NAMES} (got {self.name!r})")
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"{prefix}.impl must be one of {LOSS_IMPLS} (got {self.impl!r})")
        if self.chunk_size < 1:
            raise ValueError(f"{prefix}.chunk_size must be >= 1 (got {self.chunk_size})")


def _resolve_group(group):
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


class _GatherWithGrad(torch.autograd.Function):
    """All-gather (b, D) -> (B, D); backward sums the gradients of all ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x_bD, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x_bD) for _ in range(world)]
        dist.all_gather(parts, x_bD.contiguous(), group=group)  # collective
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_BD):
        grad_BD = grad_BD.contiguous()
        dist.all_reduce(grad_BD, group=ctx.group)  # collective: sum over ranks
        rank, b = dist.get_rank(ctx.group), grad_BD.shape[0] // dist.get_world_size(ctx.group)
        return grad_BD[rank * b : (rank + 1) * b], None


def _gather(img_bD, txt_bD, group):
    group = _resolve_group(group)
    if group is None or dist.get_world_size(group) == 1:
        return img_bD, txt_bD
    return _GatherWithGrad.apply(img_bD, group), _GatherWithGrad.apply(txt_bD, group)


def clip_loss(img_BD, txt_BD, logit_scale, *, group=None, impl="auto", chunk_size=1024):
    """Symmetric CLIP loss over the global batch; returns a scalar (same value on every rank)."""
    img, txt = _gather(img_BD, txt_BD, group)
    logits_BB = logit_scale * img.float() @ txt.float().T
    labels = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return 0.5 * (F.cross_entropy(logits_BB, labels) + F.cross_entropy(logits_BB.T, labels))


def siglip_loss(img_BD, txt_BD, logit_scale, logit_bias, *, group=None, impl="auto", chunk_size=1024):
    """SigLIP loss: -sum over all pairs log sigmoid(z * logit), divided by the global batch size."""
    img, txt = _gather(img_BD, txt_BD, group)
    logits_BB = logit_scale * img.float() @ txt.float().T + logit_bias
    z_BB = 2 * torch.eye(logits_BB.shape[0], device=logits_BB.device) - 1
    return -F.logsigmoid(z_BB * logits_BB).sum() / logits_BB.shape[0]


def compute_loss(cfg: LossConfig, out, group=None) -> torch.Tensor:
    """Loss of a model output (``.image_features``, ``.text_features``, ``.logit_scale``, ``.logit_bias``)."""
    kw = dict(group=group, impl=cfg.impl, chunk_size=cfg.chunk_size)
    if cfg.name == "clip":
        return clip_loss(out.image_features, out.text_features, out.logit_scale, **kw)
    return siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias, **kw)
