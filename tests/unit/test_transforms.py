"""Image transforms: plain path against open_clip's, fast path against the plain one (same crop geometry),
fallbacks for non-baseline images, the size guard before decoding, uint8 outputs and normalize_images."""

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image, ImageFile
from torchvision import transforms as T

from mmpretrain.data import decode
from mmpretrain.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RATIO,
    EvalTransform,
    ImageTooLargeError,
    TrainTransform,
    normalize_images,
)

# normalize_images(uint8) vs open_clip's ToTensor + Normalize of the same pixels: float rounding only
FLOAT_ATOL = 1e-5


def encode(pixels_HW3: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels_HW3).save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like smooth RGB image (H, W, 3): a few low-frequency waves per channel, range 28..228."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.zeros((height, width, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    return ((img - img.min()) / (img.max() - img.min()) * 200 + 28).astype(np.uint8)


def marker_photo(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Dark smooth background with a bright square marker at box = (top, left, h, w)."""
    img = smooth_photo(width, height) // 4
    t, left, h, w = box
    img[t : t + h, left : left + w] = 250
    return img


def centroid(img_3HW: torch.Tensor) -> torch.Tensor:
    """(row, col) centroid of the bright marker, weighted by brightness above the (dark) background."""
    mask = (img_3HW.float().mean(0) - 100).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(mask.shape[0]), torch.arange(mask.shape[1]), indexing="ij")
    return torch.stack([(ys * mask).sum(), (xs * mask).sum()]) / mask.sum()


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decode (simplejpeg or PIL) fail loudly; headers may still be read."""

    def boom(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", boom)
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


# ---------------------------------------------------------------- plain path == open_clip


def test_eval_plain_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(30, 47, 3), dtype=np.uint8))  # non-square: resize + crop
    ref = open_clip.image_transform(24, is_train=False)(img)
    out = EvalTransform(24, fast=False)(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    torch.testing.assert_close(normalize_images(out[None])[0], ref, rtol=0, atol=FLOAT_ATOL)
    data = encode(np.asarray(img), "PNG")  # lossless: from_bytes sees the same pixels
    assert torch.equal(EvalTransform(24, fast=False).from_bytes(data), out)


def test_train_plain_matches_open_clip_under_same_seed():
    open_clip = pytest.importorskip("open_clip")
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    ref_tf = open_clip.image_transform(24, is_train=True, aug_cfg={"scale": (0.5, 1.0)})
    ours = TrainTransform(24, scale=(0.5, 1.0), fast=False)
    torch.manual_seed(123)
    ref = ref_tf(img)
    state = torch.get_rng_state()
    out = ours(img, seed=123)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    torch.testing.assert_close(normalize_images(out[None])[0], ref, rtol=0, atol=FLOAT_ATOL)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG stream is untouched
    assert not torch.equal(ours(img, seed=124), out)  # the crop is random across seeds


def test_crop_params_are_torchvisions_draw_after_manual_seed():
    state = torch.get_rng_state()
    for scale in [(0.9, 1.0), (0.08, 1.0)]:
        tf = TrainTransform(24, scale)
        # (10, 400) and (400, 10): every draw misses, torchvision's fallback box
        for height, width in [(320, 400), (768, 1024), (33, 47), (10, 400), (400, 10), (1, 1)]:
            for seed in range(40):
                torch.manual_seed(seed)
                ref = T.RandomResizedCrop.get_params(torch.empty(height, width), scale, RATIO)
                assert tf.crop_params(height, width, seed) == ref, (scale, height, width, seed)
    torch.set_rng_state(state)


@pytest.mark.parametrize("fast", [True, False])
def test_outputs_are_uint8_rgb_and_convert_palette_images(fast):
    color = (200, 30, 90)
    img = Image.new("RGB", (20, 28), color).convert("P", palette=Image.Palette.ADAPTIVE)  # palette: RGB first
    png = encode(np.asarray(img.convert("RGB")), "PNG")
    outs = [TrainTransform(16, fast=fast)(img, seed=0), EvalTransform(16, fast=fast)(img)]
    outs += [TrainTransform(16, fast=fast).from_bytes(png, seed=0), EvalTransform(16, fast=fast).from_bytes(png)]
    for out in outs:
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8 and out.is_contiguous()
        assert torch.equal(out, torch.tensor(color, dtype=torch.uint8)[:, None, None].expand(3, 16, 16))


def test_normalize_images_is_clip_normalization_and_passes_floats_through():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    ref = (images.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.double)[:, None, None]) / torch.tensor(
        CLIP_STD, dtype=torch.double
    )[:, None, None]
    torch.testing.assert_close(normalize_images(images).double(), ref, rtol=0, atol=FLOAT_ATOL)
    assert normalize_images(images, torch.bfloat16).dtype == torch.bfloat16
    floats = torch.randn(2, 3, 4, 4)
    assert torch.equal(normalize_images(floats), floats)


# ---------------------------------------------------------------- fast path == plain path


def test_fast_decodes_jpegs_at_reduced_scale_when_the_crop_allows(monkeypatch):
    shapes = []
    real = simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        shapes.append(real(*args, **kwargs).shape[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    data = encode(smooth_photo(256, 192), quality=95)
    TrainTransform(32, scale=(0.9, 1.0)).from_bytes(data, seed=0)  # short side of the crop >= 172: 1/4 keeps 43
    TrainTransform(100, scale=(0.9, 1.0)).from_bytes(data, seed=0)  # 1/2 keeps <= 96 < 100: full size
    EvalTransform(24).from_bytes(data)  # the 24-px crop spans 192 px: 1/8
    assert shapes == [(48, 64), (192, 256), (24, 32)]


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("width,height", [(256, 192), (97, 131), (40, 48)])
def test_fast_train_is_close_to_plain_on_a_smooth_photo(width, height, scale):
    data = encode(smooth_photo(width, height), quality=95)
    fast, plain = TrainTransform(32, scale), TrainTransform(32, scale, fast=False)
    for seed in range(8):
        diff = (fast.from_bytes(data, seed).float() - plain.from_bytes(data, seed).float()).abs()
        _, _, h, w = fast.crop_params(height, width, seed)
        if decode.reduction_for(min(h, w), 32) == 1:  # full-size decode: the same box, torch vs PIL bicubic
            assert diff.max() <= 2, seed
        else:  # reduced decode: box start on the reduced grid (<= half a reduced pixel), DCT vs bicubic filter
            assert diff.mean() < 2.5 and diff.max() <= 12, seed


@pytest.mark.parametrize("width,height", [(256, 192), (97, 131), (40, 48), (300, 64)])
def test_fast_eval_is_close_to_plain_on_a_smooth_photo(width, height):
    data = encode(smooth_photo(width, height), quality=95)
    diff = (EvalTransform(32).from_bytes(data).float() - EvalTransform(32, fast=False).from_bytes(data).float()).abs()
    assert diff.mean() < 0.6 and diff.max() <= 3


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.3, 0.6)])
def test_fast_train_marker_lands_where_plain_puts_it(scale):
    data = encode(marker_photo(320, 256, (100, 150, 40, 40)), quality=95)
    fast, plain = TrainTransform(48, scale), TrainTransform(48, scale, fast=False)
    offsets = []
    for seed in range(30):
        ref = plain.from_bytes(data, seed)
        if (ref.float().mean(0) > 150).sum() < 4:
            continue  # the marker is (nearly) out of this crop
        offsets.append((centroid(fast.from_bytes(data, seed)) - centroid(ref)).abs().max().item())
    # the reduced decode (1/2 or 1/4 here) starts the box on its grid: <= half a reduced pixel, ~0.4 output px
    assert len(offsets) >= 10 and max(offsets) < 0.45 and np.mean(offsets) < 0.2, offsets


def test_fast_eval_marker_lands_where_plain_puts_it():
    data = encode(marker_photo(333, 250, (110, 170, 30, 30)), quality=95)  # odd sizes: partial blocks at 1/8
    out, ref = EvalTransform(24).from_bytes(data), EvalTransform(24, fast=False).from_bytes(data)
    assert (centroid(out) - centroid(ref)).abs().max() < 0.1  # eval: the reference's geometry, exactly


def test_fast_call_on_a_decoded_image_equals_from_bytes_of_lossless_bytes():
    img = Image.fromarray(smooth_photo(70, 45))
    png = encode(np.asarray(img), "PNG")
    assert torch.equal(TrainTransform(24)(img, seed=3), TrainTransform(24).from_bytes(png, seed=3))
    assert torch.equal(EvalTransform(24)(img), EvalTransform(24).from_bytes(png))


# ---------------------------------------------------------------- fallbacks


def test_grayscale_jpeg_stays_on_the_fast_path_and_is_replicated_rgb():
    gray = smooth_photo(256, 192)[..., 0]
    data = encode(gray, quality=95)
    out, ref = TrainTransform(32).from_bytes(data, seed=1), TrainTransform(32, fast=False).from_bytes(data, seed=1)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert (out.float() - ref.float()).abs().mean() < 2.5


@pytest.mark.parametrize("kind", ["png", "rgba_png", "cmyk_jpeg", "webp"])
def test_non_baseline_images_fall_back_to_pil(kind, monkeypatch):
    pixels = smooth_photo(200, 160)
    if kind == "png":
        data = encode(pixels, "PNG")
    elif kind == "rgba_png":
        data = encode(np.concatenate([pixels, np.full((160, 200, 1), 128, np.uint8)], -1), "PNG")
    elif kind == "cmyk_jpeg":  # Adobe CMYK: PIL undoes the inversion, libjpeg-turbo's RGB output would not
        buf = io.BytesIO()
        Image.fromarray(pixels).convert("CMYK").save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
    else:
        data = encode(pixels, "WEBP", lossless=True)
    expected = {
        "train": TrainTransform(32, fast=False).from_bytes(data, seed=5),
        "eval": EvalTransform(32, fast=False).from_bytes(data),
    }

    def boom(*args, **kwargs):
        raise AssertionError("simplejpeg decoded a non-baseline image")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", boom)
    for name, out in [
        ("train", TrainTransform(32).from_bytes(data, seed=5)),
        ("eval", EvalTransform(32).from_bytes(data)),
    ]:
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        assert (out.int() - expected[name].int()).abs().max() <= 1, name  # full-size decode: same box


def test_corrupt_bytes_raise_in_both_paths():
    data = encode(smooth_photo(64, 48))
    for bad in (data[: len(data) // 2], b"\xff\xd8\xff garbage", b"not an image"):
        for fast in (True, False):
            with pytest.raises((OSError, ValueError)):  # PIL's UnidentifiedImageError is an OSError
                TrainTransform(16, fast=fast).from_bytes(bad, seed=0)
            with pytest.raises((OSError, ValueError)):  # PIL's UnidentifiedImageError is an OSError
                EvalTransform(16, fast=fast).from_bytes(bad)


# ---------------------------------------------------------------- size guard


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A tiny JPEG whose frame header (SOF0) declares width x height."""
    data = bytearray(encode(smooth_photo(16, 16)))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("fast", [True, False])
def test_image_too_large_raises_before_decoding(fast, no_decoding):
    bomb = _jpeg_declaring(60000, 50000)  # 3e9 pixels declared in a ~1 kB file (PIL's own limit trips too)
    assert len(bomb) < 2000 and simplejpeg.decode_jpeg_header(bomb)[:2] == (50000, 60000)
    below_pil_limit = _jpeg_declaring(10000, 8000)  # 8e7 pixels: only our limit
    png = encode(smooth_photo(64, 48), "PNG")
    for data in (bomb, below_pil_limit, png):
        with pytest.raises(ImageTooLargeError):
            TrainTransform(16, fast=fast, max_pixels=64 * 48 - 1).from_bytes(data, seed=0)
        with pytest.raises(ImageTooLargeError):
            EvalTransform(16, fast=fast, max_pixels=64 * 48 - 1).from_bytes(data)


def test_image_at_the_limit_is_decoded():
    data = encode(smooth_photo(64, 48))
    assert TrainTransform(16, max_pixels=64 * 48).from_bytes(data, seed=0).shape == (3, 16, 16)
    assert EvalTransform(16, fast=False, max_pixels=64 * 48).from_bytes(data).shape == (3, 16, 16)
    with pytest.raises(ImageTooLargeError):
        decode.EncodedImage(data, max_pixels=64 * 48 - 1)
