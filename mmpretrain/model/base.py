"""What CLIP and SigLIP share above the towers: the output type, encode_image/encode_text, LiT locking."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelOutput:
    """What `model(images, tokens)` returns, for both families."""

    image_features: torch.Tensor  # (B, E) float32, L2-normalized
    text_features: torch.Tensor  # (B, E) float32, L2-normalized
    logit_scale: torch.Tensor  # () float32, already exp'd (and clamped at 100 for CLIP)
    logit_bias: Optional[torch.Tensor]  # () float32 for SigLIP, None for CLIP


class TwoTowerModel(nn.Module):
    """Subclasses set `vision_model`, `text_model` (towers returning TowerOutput) and the logit parameters.

    ZeRO-3 note: encode_image / encode_text call only the towers' forwards; the parameters owned by
    this top module (logit_scale, logit_bias) are read in `forward` alone, where DeepSpeed has
    gathered them.
    """

    def __init__(self, lock_image: bool):
        super().__init__()
        self.lock_image = lock_image

    def lock_image_tower(self) -> None:
        """LiT: freeze the whole image tower (projection / pooling head included) and keep it in eval mode."""
        for p in self.vision_model.parameters():
            p.requires_grad_(False)
        self.vision_model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock_image:
            self.vision_model.eval()  # a locked tower never runs train-mode behaviour (patch dropout)
        return self

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E) float32 unit vectors."""
        # pooled_only: the last block skips the tokens the embedding never reads (same values, less work)
        return F.normalize(self.vision_model(images_BCHW, pooled_only=True).embeds.float(), dim=-1)

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, E) float32 unit vectors."""
        return F.normalize(self.text_model(tokens_BL, pooled_only=True).embeds.float(), dim=-1)

    def logit_params(self):
        """(exp'd scale, bias or None), both float32; only called from forward (see the ZeRO-3 note)."""
        raise NotImplementedError

    def forward(self, images_BCHW: torch.Tensor, tokens_BL: torch.Tensor) -> ModelOutput:
        image_features = self.encode_image(images_BCHW)
        text_features = self.encode_text(tokens_BL)
        logit_scale, logit_bias = self.logit_params()
        return ModelOutput(image_features, text_features, logit_scale, logit_bias)
