"""Image transforms: PIL image -> normalized float tensor (3, S, S), as CLIP and OpenCLIP do it.

train: RGB, RandomResizedCrop(S, scale, bicubic), ToTensor, Normalize(CLIP mean/std)
eval:  RGB, Resize(shorter side -> S, bicubic), CenterCrop(S), ToTensor, Normalize

The train crop is seeded per sample (``transform(img, seed)``): the torch RNG is forked around
the crop, so a sample's crop depends only on its seed, never on how many samples a worker
decoded before. That is what lets a resumed loader skip samples without decoding them and
still produce the same crops as an uninterrupted run.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed (decompression-bomb guard); nothing was decoded."""


def check_image_size(img: Image.Image, max_pixels: int | None) -> None:
    """Raise ImageTooLargeError before decoding when width x height > max_pixels (None: no limit)."""
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageTooLargeError(f"image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


class TrainTransform:
    """RandomResizedCrop + normalize; ``__call__(img, seed) -> FloatTensor (3, S, S)``."""

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.9, 1.0),
        *,
        fast: bool = True,
        max_pixels: int | None = None,
    ):
        self.image_size, self.fast, self.max_pixels = image_size, fast, max_pixels
        self.crop = T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        img = _to_rgb(img)
        # fork: the crop draws from the global torch RNG; keep the caller's RNG stream untouched
        with torch.random.fork_rng(devices=[]):
            # CPU generator only: torch.manual_seed would also queue lazy CUDA/XPU seeding (slow, per sample)
            torch.default_generator.manual_seed(seed)
            img = self.crop(img)
        return self.to_tensor(img)

    def from_bytes(self, data: bytes, seed: int) -> torch.Tensor:
        """Decode encoded image bytes and transform them: the entry point the train loader calls."""
        with Image.open(io.BytesIO(data)) as img:
            check_image_size(img, self.max_pixels)
            return self(img, seed)


class EvalTransform:
    """Resize shorter side + center crop + normalize; ``__call__(img) -> FloatTensor (3, S, S)``."""

    def __init__(self, image_size: int, *, fast: bool = True, max_pixels: int | None = None):
        self.image_size, self.fast, self.max_pixels = image_size, fast, max_pixels
        self.transform = T.Compose(
            [
                T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(_to_rgb(img))

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Decode encoded image bytes and transform them: the entry point the eval loaders call."""
        with Image.open(io.BytesIO(data)) as img:
            check_image_size(img, self.max_pixels)
            return self(img)


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loader images -> model input of ``dtype``: uint8 (B,3,S,S) in [0, 255] are scaled and CLIP-normalized
    (run it after moving the batch to the device: the loader ships 4x fewer bytes); float input is taken
    as already normalized and only cast."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((images.float() - mean) / std).to(dtype)
