"""Encoded image bytes -> RGB uint8 pixels, decoded at a reduced scale when the caller allows it.

Baseline JPEGs (YCbCr or grayscale) go through libjpeg-turbo via simplejpeg, which can decode at 1/2, 1/4
or 1/8 of the size in the DCT domain: each 8x8 block is inverse-transformed straight to a 4x4, 2x2 or 1x1
block. That skips most of the IDCT, colour conversion and upsampling work (entropy decoding stays), and the
result is a low-passed, not aliased, smaller image: pixel edges map exactly by the factor (reduced
coordinate = original coordinate / f). Other scale factors (M/8) decode slower than full size here, so only
powers of two are used.

Everything else (PNG, WebP, CMYK/YCCK JPEGs, whose Adobe inversion PIL handles, files simplejpeg refuses)
goes through PIL at full size and is converted to RGB.

The header is read first: an image declaring more than ``max_pixels`` pixels raises ImageTooLargeError
before any pixel is decoded (decompression-bomb guard).
"""

from __future__ import annotations

import io
import math

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

MAX_REDUCTION = 8  # libjpeg's smallest DCT scale is 1/8


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed (decompression-bomb guard); nothing was decoded."""


def check_image_size(width: int, height: int, max_pixels: int | None) -> None:
    """Raise ImageTooLargeError when width x height > max_pixels (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")


def pil_to_uint8(img: Image.Image) -> np.ndarray:
    """PIL image (any mode) -> writable RGB uint8 array (H, W, 3)."""
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))


def reduction_for(min_side: float, size: int) -> int:
    """Largest DCT reduction f in (1, 2, 4, 8) that keeps a region of ``min_side`` original pixels >= size."""
    f = 1
    while f < MAX_REDUCTION and min_side / (2 * f) >= size:
        f *= 2
    return f


class EncodedImage:
    """Encoded bytes with the size their header declares; ``decode(f)`` decodes them (once).

    ``height``/``width`` are the original size in pixels, whatever scale ``decode`` picks.
    """

    def __init__(self, data: bytes, max_pixels: int | None = None):
        self.data = data
        self._pil: Image.Image | None = None
        try:
            self.height, self.width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            self.jpeg = colorspace in ("YCbCr", "Gray")  # libjpeg-turbo's Gray -> RGB is PIL's (replicated)
        except ValueError:  # not a JPEG (or a header libjpeg-turbo cannot read): PIL decides
            self.jpeg = False
        if not self.jpeg:
            self._pil = Image.open(io.BytesIO(data))  # lazy: reads the header only
            self.width, self.height = self._pil.size
        check_image_size(self.width, self.height, max_pixels)

    def decode(self, reduction: int = 1) -> tuple[np.ndarray, float, float]:
        """RGB pixels (H', W', 3) at 1/reduction of the size where possible (JPEG), and the scales (sy, sx) that
        map original pixel coordinates to decoded ones (edges: y' = y * sy)."""
        assert reduction in (1, 2, 4, 8), reduction
        if self.jpeg:
            want_h, want_w = math.ceil(self.height / reduction), math.ceil(self.width / reduction)
            try:
                # simplejpeg picks the smallest libjpeg scale whose output is >= the minimum: our 1/reduction
                pixels = simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_height=want_h, min_width=want_w)
            except ValueError:  # a JPEG libjpeg-turbo refuses (corrupt, unusual): PIL's verdict
                self.jpeg = False
                self._pil = Image.open(io.BytesIO(self.data))
            else:
                h, w = pixels.shape[:2]
                if (h, w) == (want_h, want_w):
                    return pixels, 1.0 / reduction, 1.0 / reduction
                return pixels, h / self.height, w / self.width
        with self._pil as img:
            return pil_to_uint8(img), 1.0, 1.0


def resize_region(pixels_HW3: np.ndarray, top: int, left: int, height: int, width: int, size: tuple[int, int]):
    """Crop the region and resize it to ``size`` (h, w): uint8 (3, h, w), bicubic with antialiasing.

    torch's uint8 antialiased bicubic (the AVX2 kernel torchvision v2 uses) on a channels-last view: no float
    copy, and within one grey level of PIL's bicubic resize of the same region.
    """
    img_13HW = torch.from_numpy(pixels_HW3).permute(2, 0, 1)[None]  # a channels-last view, no copy
    region = img_13HW[:, :, top : top + height, left : left + width]
    if tuple(region.shape[2:]) == tuple(size):
        return region[0].contiguous()
    return F.interpolate(region, size=size, mode="bicubic", antialias=True, align_corners=False)[0].contiguous()
