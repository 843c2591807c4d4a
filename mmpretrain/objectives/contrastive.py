"""The contrastive terms: CLIP's softmax loss (ALIGN's, with label smoothing) and SigLIP's sigmoid loss.

Both run the tiled kernels of mmpretrain.loss over the global batch: no B x B matrix anywhere.

Label smoothing (ALIGN, eps): the target row puts 1 - eps on the pair and eps / B on every column (PyTorch's
``cross_entropy(label_smoothing=eps)``). Per row, with logits s_ij and CE_i = lse_i - s_ii,

    CE_smooth_i = (1 - eps) CE_i + eps (lse_i - mean_j s_ij) = CE_i + eps (s_ii - mean_j s_ij)

and mean_j s_ij = scale * x_i . mean_j(y_j), so averaged over rows the correction is
eps * scale * (mean_i x_i.y_i - mean(x) . mean(y)): two global means, the same in both directions.
"""

from __future__ import annotations

import torch

from mmpretrain.distributed import global_mean
from mmpretrain.loss import clip_loss, siglip_loss
from mmpretrain.objectives.base import StepContext, Term, register
from mmpretrain.objectives.config import ClipTermConfig, SiglipTermConfig


def smoothing_correction(img_bD, txt_bD, logit_scale, group=None) -> torch.Tensor:
    """scale * (mean_i x_i.y_i - mean(x).mean(y)) over the global batch (see the module docstring)."""
    diag = global_mean((img_bD * txt_bD).sum(-1).mean(), group)
    mean_img_D = global_mean(img_bD.mean(0), group)
    mean_txt_D = global_mean(txt_bD.mean(0), group)
    return logit_scale * (diag - (mean_img_D * mean_txt_D).sum())


@register
class ClipTerm(Term):
    """Symmetric InfoNCE over the global batch (CLIP; ALIGN with label_smoothing)."""

    name = "clip"
    config_cls = ClipTermConfig

    def loss(self, ctx: StepContext) -> torch.Tensor:
        o, lc = ctx.out, ctx.loss_cfg
        loss = clip_loss(o.image_features, o.text_features, o.logit_scale, group=ctx.group, impl=lc.impl,
                         chunk_size=lc.chunk_size)  # fmt: skip
        if self.cfg.label_smoothing:
            eps = self.cfg.label_smoothing
            loss = loss + eps * smoothing_correction(o.image_features, o.text_features, o.logit_scale, ctx.group)
        return loss


@register
class SiglipTerm(Term):
    """Pairwise sigmoid loss over the global batch (SigLIP)."""

    name = "siglip"
    config_cls = SiglipTermConfig

    def loss(self, ctx: StepContext) -> torch.Tensor:
        o, lc = ctx.out, ctx.loss_cfg
        return siglip_loss(o.image_features, o.text_features, o.logit_scale, o.logit_bias, group=ctx.group,
                           impl=lc.impl, chunk_size=lc.chunk_size)  # fmt: skip
