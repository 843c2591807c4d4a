"""NaFlex data: the resize rule is Siglip2ImageProcessor's (grid and pixels), patches are its layout, and packing
keeps every image whole with <= 2% padding on a realistic aspect-ratio mix (1:3 to 3:1)."""

import math
import random

import numpy as np
import pytest
import torch
from mmpretrain.kernels import PAD_SEGMENT_ID
from PIL import Image

from mmpretrain.data.naflex import NaflexTransform, first_fit_decreasing, naflex_grid, pack_images, pack_lengths


def mix_of_grids(n, patch_size, budget, seed=0):
    """Grids of n images with aspect ratios log-uniform in 1:3..3:1 and sides of 200-1000 px."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        H = rng.randint(200, 1000)
        out.append(naflex_grid(H, max(1, round(H * ratio)), patch_size, budget))
    return out


def test_grid_and_pixels_are_siglip2_processors():
    from transformers import Siglip2ImageProcessor
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    rng = random.Random(1)
    for _ in range(200):
        H, W, p, budget = rng.randint(1, 900), rng.randint(1, 900), rng.choice([8, 14, 16]), rng.choice([16, 64, 256])
        want = get_image_size_for_max_num_patches(H, W, p, budget)
        assert tuple(x * p for x in naflex_grid(H, W, p, budget)) == want, (H, W, p, budget)
    # pixels: the processor without rescale and normalization gives our uint8 patches
    proc = Siglip2ImageProcessor(patch_size=8, max_num_patches=24, resample=3, do_rescale=False, do_normalize=False)
    for H, W in [(40, 100), (90, 30), (33, 33)]:
        small = np.random.default_rng(H).integers(0, 256, (H // 8 + 2, W // 8 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((W, H), Image.BILINEAR)  # smooth, like a photo (noise: see below)
        patches, (h, w) = NaflexTransform(8, 24)(img)
        got = proc(images=[img], return_tensors="pt")
        assert got["spatial_shapes"].tolist() == [[h, w]]
        diff = (got["pixel_values"][0, : h * w].float() - patches.float()).abs()
        # bicubic rounding: a grey level or two (on uint8 noise the two resizers differ by up to ~20 at a few
        # pixels); a layout error moves most of them by far more
        assert diff.max() <= 2 and (diff > 1).float().mean() < 0.01, (diff.max(), (diff > 1).float().mean())


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 3, 4, 2, 6], 10) == [[4, 2], [0, 1, 3]]


def test_padding_at_most_2_percent_on_a_mix_of_aspect_ratios():
    grids = mix_of_grids(1024, 16, 256)
    lengths = [h * w for h, w in grids]
    assert min(lengths) < 240 and max(lengths) == 256  # the budget's slack is real: 1024-token rows of 4 waste it
    padding = capacity = 0
    for k in range(0, len(lengths), 64):  # batches of 64 images, rows of at most 1024 tokens
        rows, n = pack_lengths(lengths[k : k + 64], 1024)
        assert n <= 1024 and sorted(i for r in rows for i in r) == list(range(64))  # every image once, whole
        assert all(sum(lengths[k + i] for i in r) <= n for r in rows)
        capacity += len(rows) * n
        padding += len(rows) * n - sum(lengths[k : k + 64])
    print(f"padding {100 * padding / capacity:.2f}% of {capacity} tokens")
    assert padding / capacity <= 0.02
    # the reference point: rows of exactly 1024 by first-fit decreasing alone waste more than 2%
    fixed = sum(len(first_fit_decreasing(lengths[k : k + 64], 1024)) * 1024 for k in range(0, 1024, 64))
    assert 1 - sum(lengths) / fixed > 0.02


def test_pack_images_layout():
    g = torch.Generator().manual_seed(0)
    grids = [(2, 3), (1, 1), (3, 3), (2, 2)]
    patches = [torch.randint(0, 256, (h * w, 12), generator=g, dtype=torch.uint8) for h, w in grids]
    out = pack_images(patches, grids, max_len=12, multiple=1)
    R, N, _ = out["patches"].shape
    assert N <= 12 and out["padding"] == R * N - 20
    order = out["order"].tolist()
    assert sorted(order) == [0, 1, 2, 3] and [g for row in out["shapes"] for g in row] == [grids[i] for i in order]
    k = 0
    for b, row in enumerate(out["shapes"]):
        start = 0
        for seg, (h, w) in enumerate(row):
            assert torch.equal(out["patches"][b, start : start + h * w], patches[order[k]])
            assert (out["segment_ids"][b, start : start + h * w] == seg).all()
            start, k = start + h * w, k + 1
        assert (out["patches"][b, start:] == 0).all() and (out["segment_ids"][b, start:] == PAD_SEGMENT_ID).all()
    with pytest.raises(ValueError, match="image 2 has 9 patches, more than the sequence length 8"):
        pack_images(patches, grids, max_len=8)
