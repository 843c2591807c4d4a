"""Image transforms: encoded bytes or a PIL image -> uint8 tensor (3, S, S), as CLIP and OpenCLIP crop it.

train: RGB, RandomResizedCrop(S, scale, bicubic)
eval:  RGB, Resize(shorter side -> S, bicubic), CenterCrop(S)

Outputs are uint8 in [0, 255]: the loader ships 4x fewer bytes and the train/eval loops scale and
CLIP-normalize on the device with ``normalize_images``. ``normalize_images(transform(img)[None])`` is
open_clip's float transform up to float rounding (fast=False) or to a grey level and the geometry notes below.

Two paths, picked by ``fast``:
  fast=False  PIL + torchvision, exactly open_clip's pixels: the reference.
  fast=True   (default) the same crop geometry from the same seed, but JPEGs are decoded at 1/2, 1/4 or 1/8
              scale in the DCT domain when the crop still has >= S pixels on both sides there (decode.py),
              and the crop is resized with torch's uint8 antialiased bicubic (within a grey level of PIL's).
              At full scale the train crop box is the reference's exactly; at reduced scale it starts on
              the reduced grid (<= half a reduced pixel off) and ends exactly. The eval path resizes the
              whole reduced image to the reference's resized size and center-crops it: the reference's
              geometry. Images other than YCbCr/grayscale JPEGs (PNG, WebP, CMYK) are decoded by PIL at
              full size. ``__call__`` on an already decoded PIL image takes the full-size route.

The train crop is seeded per sample (``from_bytes(data, seed)``): it is drawn from a private generator
seeded with ``seed`` (the global torch RNG is untouched), so a sample's crop depends only on its seed,
never on how many samples a worker decoded before. That is what lets a resumed loader skip samples
without decoding them and still produce the same crops as an uninterrupted run. Both paths draw
(i, j, h, w) as torchvision's RandomResizedCrop.get_params does after ``torch.manual_seed(seed)``, on
the original image size, so fast and plain crop the same region.

Local crops (``local_crops=n``, self-distillation's student views): ``from_bytes`` then returns (1 + n, 3, S, S),
the train crop first and n RandomResizedCrops of ``local_scale`` after it, each at the model's size S and seeded
by (seed, its index), so they too depend on the sample's seed alone; the image is decoded once, at the reduced
scale the smallest box allows. The loaders' collates split the two (``split_views``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..model.naflex import PackedImages
from .decode import EncodedImage, ImageTooLargeError, open_image, pil_to_uint8, reduction_for, resize_region

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EvalTransform",
    "ImageTooLargeError",
    "TrainTransform",
    "normalize_images",
    "split_views",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (torchvision's and open_clip's default)
_LOG_RATIO = tuple(torch.log(torch.tensor(RATIO)).tolist())  # float32 logs, as torchvision draws them


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W), contiguous."""
    return torch.from_numpy(pil_to_uint8(img)).permute(2, 0, 1).contiguous()


class TrainTransform:
    """RandomResizedCrop to uint8 (3, S, S): ``from_bytes(data, seed)`` or ``__call__(pil_image, seed)``."""

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.9, 1.0),
        *,
        fast: bool = True,
        max_pixels: int | None = None,
        local_crops: int = 0,
        local_scale: tuple[float, float] = (0.05, 0.4),
    ):
        self.image_size, self.fast, self.max_pixels = image_size, fast, max_pixels
        self.scale = tuple(scale)
        self.local_crops, self.local_scale = local_crops, tuple(local_scale)

    def boxes(self, height: int, width: int, seed: int) -> list[tuple[int, int, int, int]]:
        """The train crop's box, then each local crop's (seeded by (seed, k)); one box without local crops."""
        boxes = [self.crop_params(height, width, seed)]
        for k in range(self.local_crops):
            local_seed = (seed * 1_000_003 + k + 1) % (2**63 - 1)
            boxes.append(self.crop_params(height, width, local_seed, self.local_scale))
        return boxes

    def crop_params(
        self, height: int, width: int, seed: int, scale: tuple[float, float] | None = None
    ) -> tuple[int, int, int, int]:
        """Crop box (top, left, h, w) in original pixels for this seed; the global torch RNG is untouched.

        torchvision's RandomResizedCrop.get_params algorithm, drawn from a private generator seeded with
        ``seed``: the same numbers get_params draws after ``torch.manual_seed(seed)`` (a test pins it), at a
        fifth of its cost (it is per sample).
        """
        g = torch.Generator().manual_seed(seed)
        area = height * width
        lo, hi = self.scale if scale is None else scale
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(lo, hi, generator=g).item()
            aspect = torch.empty(1).uniform_(_LOG_RATIO[0], _LOG_RATIO[1], generator=g).exp_().item()  # float32
            w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
                j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
                return i, j, h, w
        # ten misses (extreme aspect ratios or scales): the largest centered box within the ratio range
        if width / height < min(RATIO):
            w, h = width, round(width / min(RATIO))
        elif width / height > max(RATIO):
            w, h = round(height * max(RATIO)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        """Transform a decoded image (no reduced-scale decoding here: that needs the encoded bytes)."""
        size, views = self.image_size, []
        pixels = pil_to_uint8(img) if self.fast else None
        img = img if self.fast or img.mode == "RGB" else img.convert("RGB")
        for i, j, h, w in self.boxes(img.height, img.width, seed):
            if self.fast:
                views.append(resize_region(pixels, i, j, h, w, (size, size)))
            else:
                crop = TF.resized_crop(img, i, j, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
                views.append(_to_uint8_tensor(crop))
        return views[0] if not self.local_crops else torch.stack(views)

    def from_bytes(self, data: bytes, seed: int, with_crop: bool = False):
        """Decode encoded image bytes and transform them: the entry point the train loader calls. ``with_crop``:
        (views, (top, left, h, w) of the train crop, (height, width) of the image) (region boxes follow the crop)."""
        if not self.fast:
            with open_image(data, self.max_pixels) as img:
                views, height, width = self(img, seed), img.height, img.width
        else:
            enc = EncodedImage(data, self.max_pixels)  # header only; raises ImageTooLargeError
            height, width = enc.height, enc.width
            boxes = self.boxes(height, width, seed)
            pixels, sy, sx = enc.decode(reduction_for(min(min(h, w) for _, _, h, w in boxes), self.image_size))
            size = (self.image_size, self.image_size)
            views = [resize_region(pixels, i * sy, j * sx, h * sy, w * sx, size) for i, j, h, w in boxes]
            views = views[0] if not self.local_crops else torch.stack(views)
        if with_crop:
            return views, self.crop_params(height, width, seed), (height, width)
        return views


def split_views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A collated batch of TrainTransform outputs -> (train crops (b, 3, S, S), local crops (b, n, 3, S, S) or
    None): with local crops each sample is (1 + n, 3, S, S), the train crop first."""
    if images.dim() == 5:
        return images[:, 0], images[:, 1:]
    return images, None


class EvalTransform:
    """Resize shorter side + center crop to uint8 (3, S, S): ``from_bytes(data)`` or ``__call__(pil_image)``."""

    def __init__(self, image_size: int, *, fast: bool = True, max_pixels: int | None = None):
        self.image_size, self.fast, self.max_pixels = image_size, fast, max_pixels
        self.reference = T.Compose(
            [T.Resize(image_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's Resize(S) output size: shorter side -> S, longer side scaled and truncated."""
        size = self.image_size
        if width <= height:
            return int(size * height / width), size
        return size, int(size * width / height)

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The center crop as (top, left, h, w) in original pixels (region boxes follow it)."""
        size = self.image_size
        new_h, new_w = self.resized_size(height, width)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        sy, sx = height / new_h, width / new_w
        return top * sy, left * sx, size * sy, size * sx

    def _resize_and_crop(
        self, pixels: np.ndarray, height: int, width: int, sy: float = 1.0, sx: float = 1.0
    ) -> torch.Tensor:
        """pixels: the decode, at scales (sy, sx), of an original height x width image -> uint8 (3, S, S)."""
        size = self.image_size
        new_h, new_w = self.resized_size(height, width)
        # the whole image, whose extent in decoded pixels is fractional when a reduced decode ends in a part-pixel
        resized = resize_region(pixels, 0, 0, height * sy, width * sx, (new_h, new_w))  # (3, new_h, new_w)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # CenterCrop's rounding
        return resized[:, top : top + size, left : left + size].contiguous()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transform a decoded image (no reduced-scale decoding here: that needs the encoded bytes)."""
        if self.fast:
            return self._resize_and_crop(pil_to_uint8(img), img.height, img.width)
        return _to_uint8_tensor(self.reference(img if img.mode == "RGB" else img.convert("RGB")))

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Decode encoded image bytes and transform them: the entry point the eval loaders call."""
        if not self.fast:
            with open_image(data, self.max_pixels) as img:
                return self(img)
        enc = EncodedImage(data, self.max_pixels)  # header only; raises ImageTooLargeError
        new_h, new_w = self.resized_size(enc.height, enc.width)
        # the largest reduction at which the decoded image is still >= the resized size on both sides
        crop_side = self.image_size * min(enc.height / new_h, enc.width / new_w)  # the crop in original pixels
        pixels, sy, sx = enc.decode(reduction_for(crop_side, self.image_size))
        return self._resize_and_crop(pixels, enc.height, enc.width, sy, sx)


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loader images -> model input of ``dtype``: uint8 (B,3,S,S) in [0, 255] are scaled and CLIP-normalized
    (run it after moving the batch to the device: the loader ships 4x fewer bytes); float input is taken
    as already normalized and only cast. A PackedImages (NaFlex) gets the same per channel on its patches
    (p*p*3 values, channel last); its padding is normalized too (no image attends to it)."""
    if isinstance(images, PackedImages):
        return PackedImages(_normalize_patches(images.patches_BNK, dtype), images.segment_ids_BN, images.shapes)
    if images.dtype != torch.uint8:
        return images.to(dtype)
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((images.float() - mean) / std).to(dtype)


def _normalize_patches(patches_BNK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, p*p*3) patches, pixels in (row, column, channel) order -> CLIP-normalized ``dtype``."""
    if patches_BNK.dtype != torch.uint8:
        return patches_BNK.to(dtype)
    reps = patches_BNK.shape[-1] // 3
    mean = torch.tensor(CLIP_MEAN, device=patches_BNK.device, dtype=torch.float32).repeat(reps) * 255.0
    std = torch.tensor(CLIP_STD, device=patches_BNK.device, dtype=torch.float32).repeat(reps) * 255.0
    return ((patches_BNK.float() - mean) / std).to(dtype)
