"""Resize position embeddings: the image tower's for another input size (e.g. a 224 px model for a 336 px
fine-tune), the text tower's for another context length (e.g. 77 -> 248 tokens for long captions).

Image: the patch-grid rows are resampled bicubically on the 2-D grid (g x g -> g' x g', computed in float32);
CLIP's class-token row (row 0) is kept as it is. g = image_size // patch_size.

Text, longer: the first `keep` positions (20, or all when fewer) are kept as they are, and the rest are stretched
linearly over the new positions, the last onto the last (Long-CLIP's "knowledge-preserved stretching", Zhang et
al. 2024: the first positions are the well-trained ones, since most captions are short). A CLIP text tower
(causal, pooled at the end-of-text token) then gives exactly the old features for captions that end before
`keep`. Shorter: the first positions are kept.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

POS_KEY = "vision_model.embeddings.position_embedding.weight"
TEXT_POS_KEY = "text_model.embeddings.position_embedding.weight"
KEEP_TEXT_POSITIONS = 20


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


def stretch_positions(pos_LD: torch.Tensor, length: int, keep: int = KEEP_TEXT_POSITIONS) -> torch.Tensor:
    """(length, D): the first min(keep, L) rows as they are; the rest of the L rows linearly stretched over the
    remaining new rows (row `keep` onto row `keep`, the last onto the last); or the first `length` rows."""
    old = pos_LD.shape[0]
    if length <= old:
        return pos_LD[:length].clone()
    keep = min(keep, old - 1)
    src = pos_LD.float()
    # new row j >= keep sits at old coordinate keep + (j - keep) * (old - 1 - keep) / (length - 1 - keep)
    coord = keep + (torch.arange(keep, length, dtype=torch.float64) - keep) * (old - 1 - keep) / (length - 1 - keep)
    lo = coord.floor().long().clamp(max=old - 1)
    hi = (lo + 1).clamp(max=old - 1)
    frac = (coord - lo).to(torch.float32)[:, None]
    tail = src[lo] * (1 - frac) + src[hi] * frac
    return torch.cat([src[:keep], tail]).to(pos_LD.dtype)


def resize_text_position_embedding(sd: dict[str, torch.Tensor], model_cfg, context_length: int):
    """(new state dict, new ModelConfig) for a text context of context_length tokens (see stretch_positions)."""
    if context_length < 2:
        raise ValueError(f"--context-length must be at least 2 (got {context_length})")
    out = dict(sd)
    out[TEXT_POS_KEY] = stretch_positions(sd[TEXT_POS_KEY], context_length)
    t = model_cfg.text
    return out, dataclasses.replace(model_cfg, text=dataclasses.replace(t, context_length=context_length))


def fit_position_embeddings(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], model_cfg) -> tuple:
    """Weights for another image size or text length than this model's, resized to fit ``own`` (the model's
    state dict): (state dict, [what was resized, for the user]). Other tensors are not touched."""
    notes, sd = [], dict(sd)
    if TEXT_POS_KEY in sd and TEXT_POS_KEY in own and sd[TEXT_POS_KEY].shape[0] != own[TEXT_POS_KEY].shape[0]:
        old, new = sd[TEXT_POS_KEY].shape[0], own[TEXT_POS_KEY].shape[0]
        if sd[TEXT_POS_KEY].shape[1:] == own[TEXT_POS_KEY].shape[1:]:
            sd[TEXT_POS_KEY] = stretch_positions(sd[TEXT_POS_KEY], new)
            how = f"first {min(KEEP_TEXT_POSITIONS, old - 1)} kept, the rest stretched" if new > old else "truncated"
            notes.append(f"text positions {old} -> {new} ({how})")
    if POS_KEY in sd and POS_KEY in own and sd[POS_KEY].shape[0] != own[POS_KEY].shape[0]:
        v = model_cfg.vision
        prefix = 1 if model_cfg.family == "clip" else 0
        old_g = math.isqrt(sd[POS_KEY].shape[0] - prefix)
        if old_g * old_g == sd[POS_KEY].shape[0] - prefix and sd[POS_KEY].shape[1:] == own[POS_KEY].shape[1:]:
            old_cfg = dataclasses.replace(model_cfg, vision=dataclasses.replace(v, image_size=old_g * v.patch_size))
            sd, _ = resize_position_embedding(sd, old_cfg, v.image_size)
            notes.append(f"image positions {old_g}x{old_g} -> {v.image_size // v.patch_size}x"
                         f"{v.image_size // v.patch_size} patches (bicubic)")  # fmt: skip
    return sd, notes
