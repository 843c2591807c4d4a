"""NaFlex data: aspect-ratio-preserving resize to a patch budget, patchify, and sequence packing.

``naflex_grid`` is transformers' Siglip2ImageProcessor size rule: the largest scale (binary search to 1e-5) at
which both sides, rounded UP to whole patches (at least one), give at most ``max_patches`` patches; the image
is then resized to (h * p, w * p) pixels (bicubic, antialiased) and cut into h * w patches, row-major, each
patch's pixels in (row, column, channel) order (what the processor and ``mmpretrain.model.naflex`` expect).

Packing (``pack_lengths``): the images of a batch (token counts l_i <= max_len) go into R rows of one length N
<= max_len. R starts at ceil(sum l / max_len) and N at sum l / R (rounded up to ``multiple``); first-fit
decreasing places the images, and N grows by ``multiple`` (then R by one once N reaches max_len) until they fit
into R rows. Rows of one length near the mean fill far better than rows of a fixed length that is a multiple of
the budget: images resized to a budget of 256 patches hold 228-256 (about 250 on average, 2.5% below the budget),
and that slack is what padding every image to the budget, or packing 4 of them into 1024, wastes. Measured
(tests/unit/test_naflex_data.py): aspect ratios log-uniform in 1:3..3:1, 16 px patches, budget 256, rows of at
most 1024, batches of 64: about 1% padding (the test asserts <= 2%).

Every image fits: an image of more than max_len patches is refused (ValueError naming it; data.naflex checks
max_patches <= seq_len, so a run never meets one). Images that fail to decode or are too large to decode are
skipped and counted by the loader as every other image (``corrupt_image``, ``oversized_image``).
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..model.naflex import (  # model and data share a layer; the model owns the packed layout
    PackedImages,
    segment_ids_for_rows,
)
from .decode import open_image, pil_to_uint8


def naflex_grid(height: int, width: int, patch_size: int, max_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """(h, w) patch grid of a height x width image resized to at most max_patches patches, aspect ratio kept."""
    if height < 1 or width < 1 or patch_size < 1 or max_patches < 1:
        raise ValueError(f"naflex_grid: sizes must be >= 1 (got {height}x{width}, p={patch_size}, {max_patches})")

    def side(scale: float, n: int) -> int:
        return max(1, math.ceil(n * scale / patch_size))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if side(mid, height) * side(mid, width) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def patchify(img_CHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, h*p, w*p) -> (h*w, p*p*C): row-major patches, each patch's pixels in (row, column, channel) order."""
    C, H, W = img_CHW.shape
    p = patch_size
    x = img_CHW.reshape(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0)
    return x.reshape((H // p) * (W // p), p * p * C)


class NaflexTransform:
    """Image -> (uint8 patches (h*w, p*p*3), (h, w)): resized to the patch budget, aspect ratio kept."""

    def __init__(self, patch_size: int, max_patches: int, *, max_pixels: int | None = None):
        self.patch_size, self.max_patches, self.max_pixels = patch_size, max_patches, max_pixels

    def __call__(self, img: Image.Image | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """A PIL image or uint8 (3, H, W) tensor."""
        if isinstance(img, Image.Image):
            img = torch.from_numpy(pil_to_uint8(img)).permute(2, 0, 1).contiguous()
        _, H, W = img.shape
        h, w = naflex_grid(H, W, self.patch_size, self.max_patches)
        p = self.patch_size
        resized = TF.resize(img, [h * p, w * p], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return patchify(resized, p), (h, w)

    def from_bytes(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
        """Decode encoded image bytes (ImageTooLargeError past max_pixels) and transform them."""
        with open_image(data, self.max_pixels) as img:
            return self(img)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into lengths) of total <= capacity: longest first, each into the first bin it fits."""
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= capacity:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def pack_lengths(lengths: list[int], max_len: int, multiple: int = 8) -> tuple[list[list[int]], int]:
    """(rows: lists of indices into lengths, row length N): the fewest rows of one length <= max_len, N as short
    as first-fit decreasing allows (see the module docstring). multiple: N is rounded up to it."""
    if not lengths:
        raise ValueError("pack_lengths: no images to pack")
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        i = too_long[0]
        raise ValueError(f"pack_lengths: image {i} has {lengths[i]} patches, more than the sequence length "
                         f"{max_len} (data.naflex.max_patches must be <= data.naflex.seq_len)")  # fmt: skip
    total = sum(lengths)
    rows = math.ceil(total / max_len)
    while True:
        n = min(max_len, -(-math.ceil(total / rows) // multiple) * multiple)
        while True:
            bins = first_fit_decreasing(lengths, n)
            if len(bins) <= rows:
                return bins, n
            if n >= max_len:
                break
            n = min(max_len, n + multiple)
        rows += 1


def pack_images(patches: list[torch.Tensor], grids: list[tuple[int, int]], max_len: int, multiple: int = 8) -> dict:
    """Pack patchified images (each (h*w, K), uint8 or float) into rows.

    -> {"patches": (R, N, K), zeros on padding; "segment_ids": (R, N) int32 (mmpretrain.kernels convention);
        "shapes": R lists of (h, w) in packing order; "order": (I,) long, the input index of each packed image in
        packing order (reorder the captions with it); "padding": int, padding tokens}
    """
    bins, n = pack_lengths([h * w for h, w in grids], max_len, multiple)
    K = patches[0].shape[1]
    out = patches[0].new_zeros(len(bins), n, K)
    for b, row in enumerate(bins):
        start = 0
        for i in row:
            out[b, start : start + len(patches[i])] = patches[i]
            start += len(patches[i])
    shapes = [[tuple(grids[i]) for i in row] for row in bins]
    used = sum(h * w for h, w in grids)
    order = torch.tensor([i for row in bins for i in row], dtype=torch.long)
    return {"patches": out, "segment_ids": segment_ids_for_rows(shapes, n), "shapes": shapes, "order": order,
            "padding": len(bins) * n - used}  # fmt: skip


# ---------------------------------------------------------------- the train loader's parts (data.naflex.enabled)


class NaflexTrainTransform(NaflexTransform):
    """The train loader's transform under data.naflex: ``from_bytes(data, seed)`` -> (uint8 patches padded with
    zeros to (max_patches, p*p*3), (h, w)); the whole image, no random crop (``seed`` is unused)."""

    def from_bytes(self, data: bytes, seed: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
        patches, grid = super().from_bytes(data)
        out = patches.new_zeros(self.max_patches, patches.shape[1])
        out[: len(patches)] = patches
        return out, grid


def stack_images(images: list) -> dict:
    """A batch's decoded images: {"image": (b, 3, S, S)}, or under data.naflex {"image": (b, max_patches, K) uint8,
    "grid": (b, 2) long (h, w)} from NaflexTrainTransform's pairs."""
    if images and isinstance(images[0], tuple):
        return {"image": torch.stack([p for p, _ in images]), "grid": torch.tensor([g for _, g in images])}
    return {"image": torch.stack(images)}


def pack_batch(batch: dict, cfg) -> dict:
    """A loader batch with "grid" -> the same samples packed (cfg: data.naflex): "image" becomes a PackedImages of
    uint8 patches (normalize_images normalizes it on the device); "text", "label" and "keys" follow the images'
    packing order; "naflex" holds {"padding": tokens, "tokens": R x N}. Runs in the training process, on the host."""
    grids = [tuple(g) for g in batch.pop("grid").tolist()]
    patches = [img[: h * w] for img, (h, w) in zip(batch["image"], grids)]
    packed = pack_images(patches, grids, cfg.seq_len, cfg.multiple)
    order = packed["order"]
    out = dict(batch)
    out["image"] = PackedImages(packed["patches"], packed["segment_ids"], packed["shapes"])
    for name in ("text", "label", "decoder_text", "decoder_prompt", "decoder_task"):  # per-sample tensors
        if name in batch:
            out[name] = batch[name][order]
    if "keys" in batch:
        out["keys"] = [batch["keys"][i] for i in order.tolist()]
    out["naflex"] = {"padding": packed["padding"], "tokens": packed["patches"].shape[0] * packed["patches"].shape[1]}
    return out
