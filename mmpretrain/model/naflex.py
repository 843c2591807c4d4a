"""NaFlex inputs with true sequence packing: several images of their own aspect ratio in one token sequence.

Each image is resized (keeping its aspect ratio) to a patch grid (h_i, w_i) within a patch budget and cut into
h_i * w_i patches (mmpretrain.data.naflex). A packed batch lays the images of each row one after another from the
row's start, row-major patches within an image, then padding to the row length N:

    patches_BNK     (B, N, K) float, K = p * p * 3 pixels of a patch in (row, column, channel) order (as
                    transformers' Siglip2ImageProcessor flattens them), normalized; padding rows are 0
    segment_ids_BN  (B, N) int32: 0, 1, 2 ... per image in packing order, PAD_SEGMENT_ID on padding (the
                    convention of mmpretrain.kernels.attention: non-decreasing along a row)
    shapes          per row, the (h_i, w_i) patch grid of each of its images, in packing order (host ints:
                    the layout is known on the host, so the model needs no device sync to read it)

The vision tower (SigLIP) adds each image's position embedding (the learned g x g table resized to (h_i, w_i),
bilinear, antialiased, as transformers' Siglip2 does), attends block-diagonally through the segment ids and pools
each image over its own tokens (one MAP query per image), giving one embedding per image in packing order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmpretrain.kernels import PAD_SEGMENT_ID


@dataclass
class PackedImages:
    """A packed NaFlex batch (see the module docstring); images are numbered row by row, in packing order."""

    patches_BNK: torch.Tensor  # (B, N, p * p * 3) float, or uint8 pixels (normalized on the device, see .normalized)
    segment_ids_BN: torch.Tensor  # (B, N) int32
    shapes: list  # B lists of (h, w) patch grids, one per image of the row

    @property
    def num_images(self) -> int:
        return sum(len(row) for row in self.shapes)

    def to(self, device, dtype=None, non_blocking: bool = False) -> PackedImages:
        """On ``device``; float patches cast to ``dtype`` when given (uint8 stays uint8)."""
        patches = self.patches_BNK.to(device, non_blocking=non_blocking)
        if dtype is not None and patches.is_floating_point():
            patches = patches.to(dtype)
        return PackedImages(patches, self.segment_ids_BN.to(device, non_blocking=non_blocking), self.shapes)

    def check(self, patch_size: int, prefix: str = "images") -> None:
        """ValueError naming the bad field unless the three parts fit together (host-side checks only)."""
        B, N, K = self.patches_BNK.shape
        if K != patch_size * patch_size * 3:
            raise ValueError(f"{prefix}.patches_BNK: {K} values per patch, the model's patch_size {patch_size} "
                             f"needs {patch_size * patch_size * 3}")  # fmt: skip
        if tuple(self.segment_ids_BN.shape) != (B, N) or self.segment_ids_BN.dtype != torch.int32:
            raise ValueError(f"{prefix}.segment_ids_BN must be int32 ({B}, {N}) (got {self.segment_ids_BN.dtype} "
                             f"{tuple(self.segment_ids_BN.shape)})")  # fmt: skip
        if len(self.shapes) != B:
            raise ValueError(f"{prefix}.shapes: {len(self.shapes)} rows for a batch of {B}")
        for b, row in enumerate(self.shapes):
            used = sum(h * w for h, w in row)
            if used > N or any(h <= 0 or w <= 0 for h, w in row):
                raise ValueError(f"{prefix}.shapes[{b}]: grids {row} ({used} patches) do not fit a row of {N}")


def segment_ids_for_rows(shapes: list, length: int) -> torch.Tensor:
    """(B, length) int32 segment ids of rows holding images of these (h, w) grids, packed from each row's start."""
    out = torch.full((len(shapes), length), PAD_SEGMENT_ID, dtype=torch.int32)
    for b, row in enumerate(shapes):
        start = 0
        for i, (h, w) in enumerate(row):
            out[b, start : start + h * w] = i
            start += h * w
    return out


def resize_position_grid(grid_ggD: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The learned (g, g, D) position table resized to (h, w): -> (h * w, D), row-major.

    Bilinear, antialiased, align_corners False (what transformers' Siglip2 does); computed in float32 at least
    (float64 stays float64), returned in the table's dtype. At (g, g) it is the identity.
    """
    g, _, D = grid_ggD.shape
    if (h, w) == (g, g):
        return grid_ggD.reshape(g * g, D)
    compute = torch.float64 if grid_ggD.dtype == torch.float64 else torch.float32
    grid_1Dgg = grid_ggD.to(compute).permute(2, 0, 1).unsqueeze(0)
    out_1Dhw = F.interpolate(grid_1Dgg, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out_1Dhw[0].flatten(1).transpose(0, 1).to(grid_ggD.dtype)


def packed_positions(grid_ggD: torch.Tensor, shapes: list, length: int) -> torch.Tensor:
    """(B, length, D): each image's resized position table at its tokens, 0 on padding. Each distinct grid is
    resized once."""
    D = grid_ggD.shape[-1]
    cache = {}
    rows = []
    for row in shapes:
        parts = []
        for h, w in row:
            if (h, w) not in cache:
                cache[(h, w)] = resize_position_grid(grid_ggD, h, w)
            parts.append(cache[(h, w)])
        used = sum(h * w for h, w in row)
        parts.append(grid_ggD.new_zeros(length - used, D))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def query_layout(shapes: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One pooling query per image: (q_segment_ids_BQ int32, flat index (I,) of each image's query in (B * Q)).

    Q is the most images in a row; query q of row b carries segment id q (its image), or PAD_SEGMENT_ID past the
    row's images (those outputs are dropped).
    """
    Q = max(len(row) for row in shapes)
    q_ids = torch.full((len(shapes), Q), PAD_SEGMENT_ID, dtype=torch.int32)
    index = []
    for b, row in enumerate(shapes):
        q_ids[b, : len(row)] = torch.arange(len(row), dtype=torch.int32)
        index.extend(b * Q + q for q in range(len(row)))
    return q_ids.to(device), torch.tensor(index, dtype=torch.long).to(device)
