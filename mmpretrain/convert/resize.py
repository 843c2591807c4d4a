"""Resize the image tower's position embedding to another input size (e.g. a 224 px model for a 336 px fine-tune).

The patch-grid rows are resampled bicubically on the 2-D grid (g x g -> g' x g', computed in float32);
CLIP's class-token row (row 0) is kept as it is. g = image_size // patch_size.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

POS_KEY = "vision_model.embeddings.position_embedding.weight"


def resize_position_embedding(sd: dict[str, torch.Tensor], model_cfg, image_size: int):
    """(new state dict, new resolved ModelConfig) for image_size; other tensors are shared, not copied."""
    v = model_cfg.vision
    if image_size < v.patch_size:
        raise ValueError(f"--image-size must be at least the patch size {v.patch_size} (got {image_size})")
    old_g, new_g = v.image_size // v.patch_size, image_size // v.patch_size
    num_prefix = 1 if model_cfg.family == "clip" else 0  # CLIP's class token; SigLIP has none
    pos_ND = sd[POS_KEY]
    assert pos_ND.shape[0] == num_prefix + old_g * old_g, (pos_ND.shape, old_g)
    prefix, grid = pos_ND[:num_prefix], pos_ND[num_prefix:]
    if new_g != old_g:
        grid_1Dgg = grid.float().reshape(old_g, old_g, -1).permute(2, 0, 1)[None]
        grid_1Dgg = F.interpolate(grid_1Dgg, size=(new_g, new_g), mode="bicubic", align_corners=False)
        grid = grid_1Dgg[0].permute(1, 2, 0).reshape(new_g * new_g, -1).to(pos_ND.dtype)
    out = dict(sd)
    out[POS_KEY] = torch.cat([prefix, grid], dim=0)
    new_cfg = dataclasses.replace(model_cfg, vision=dataclasses.replace(v, image_size=image_size))
    return out, new_cfg
