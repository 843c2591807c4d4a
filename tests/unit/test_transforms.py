"""Image transforms: train/eval against open_clip's, CLIP normalization, RGB conversion."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmpretrain.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform

# ---------------------------------------------------------------- transforms


def test_eval_transform_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(30, 47, 3), dtype=np.uint8))  # non-square: resize + crop
    ref = open_clip.image_transform(24, is_train=False)(img)
    out = EvalTransform(24)(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_train_transform_matches_open_clip_under_same_seed():
    open_clip = pytest.importorskip("open_clip")
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    ref_tf = open_clip.image_transform(24, is_train=True, aug_cfg={"scale": (0.5, 1.0)})
    ours = TrainTransform(24, scale=(0.5, 1.0))
    torch.manual_seed(123)
    ref = ref_tf(img)
    state = torch.get_rng_state()
    out = ours(img, seed=123)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG stream is untouched
    assert not torch.equal(ours(img, seed=124), out)  # the crop is random across seeds


def test_transforms_normalize_with_clip_stats_and_convert_to_rgb():
    color = (200, 30, 90)
    img = Image.new("RGB", (20, 28), color).convert("P", palette=Image.Palette.ADAPTIVE)  # palette: RGB first
    expected = (torch.tensor(color) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # (3,)
    for out in (TrainTransform(16)(img, seed=0), EvalTransform(16)(img)):
        assert out.shape == (3, 16, 16)
        torch.testing.assert_close(out, expected[:, None, None].expand(3, 16, 16), atol=1e-5, rtol=0)
