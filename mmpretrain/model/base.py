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
    # Asked for with `need` (objectives beyond the contrastive loss read them; None otherwise):
    image_tokens: Optional[torch.Tensor] = None  # (B, N', D_v) the vision tower's last_hidden_state (all tokens;
    # under patch dropout / MIM masking the prefix tokens then the kept patches)
    image_keep: Optional[torch.Tensor] = None  # (B, K) indices of the kept patches, or None when none was dropped
    text_tokens: Optional[torch.Tensor] = None  # (B, L, D_t) the text tower's last_hidden_state (all positions)


NEEDS = ("image_tokens", "text_tokens")  # what `forward(..., need=...)` can add to the output


class TwoTowerModel(nn.Module):
    """Subclasses set `vision_model`, `text_model` (towers returning TowerOutput) and the logit parameters.

    ZeRO-3 note: encode_image / encode_text call only the towers' forwards; the parameters owned by
    this top module (logit_scale, logit_bias) are read in `forward` alone, where DeepSpeed has
    gathered them.
    """

    def __init__(self, lock_image: bool):
        super().__init__()
        self.lock_image = lock_image
        # Trainable parts of objectives beyond the contrastive loss (ITM fusion encoder, MIM decoder, ...), keyed
        # by term name; attached by mmpretrain.objectives before the engine is built. Empty: no state dict keys.
        self.heads = nn.ModuleDict()

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

    def forward(
        self,
        images_BCHW: Optional[torch.Tensor] = None,
        tokens_BL: Optional[torch.Tensor] = None,
        need: tuple = (),
        patch_drop: Optional[float] = None,
        head: Optional[str] = None,
        **head_inputs,
    ):
        """`model(images, tokens)` -> ModelOutput; `need` adds token states (names in NEEDS); `patch_drop`
        overrides the training patch-dropout fraction for this call (MIM's mask ratio).

        `model(head=name, **inputs)` runs `self.heads[name](**inputs)` instead: objectives call their heads
        through the engine this way, so DeepSpeed (ZeRO-3 gathering, precision) treats them like the towers.
        """
        if head is not None:
            if head not in self.heads:
                raise KeyError(f"no head {head!r} (have {sorted(self.heads)})")
            return self.heads[head](**head_inputs)
        unknown = set(need) - set(NEEDS)
        if unknown:
            raise ValueError(f"need: unknown {sorted(unknown)} (known {NEEDS})")
        if "image_tokens" in need or patch_drop is not None:
            v = self.vision_model(images_BCHW, pooled_only="image_tokens" not in need, patch_drop=patch_drop)
            image_features, image_keep = F.normalize(v.embeds.float(), dim=-1), v.keep_BK
            image_tokens = v.last_hidden_state if "image_tokens" in need else None
        else:
            image_features, image_tokens, image_keep = self.encode_image(images_BCHW), None, None
        if "text_tokens" in need:
            t = self.text_model(tokens_BL)
            text_features, text_tokens = F.normalize(t.embeds.float(), dim=-1), t.last_hidden_state
        else:
            text_features, text_tokens = self.encode_text(tokens_BL), None
        logit_scale, logit_bias = self.logit_params()
        return ModelOutput(
            image_features, text_features, logit_scale, logit_bias, image_tokens, image_keep, text_tokens
        )
