"""Encoded image bytes -> RGB uint8 pixels, decoded at a reduced scale when the caller allows it.

YCbCr and grayscale JPEGs (baseline or progressive) go through libjpeg-turbo via simplejpeg, which can
decode at 1/2, 1/4 or 1/8 of the size in the DCT domain: each 8x8 block is inverse-transformed straight
to a 4x4, 2x2 or 1x1 block. That skips most of the IDCT, colour conversion and upsampling work (entropy
decoding stays), and the result is a low-passed, not aliased, smaller image: pixel edges map exactly by
the factor (reduced coordinate = original coordinate / f). Other scale factors (M/8) decode slower than
full size here, so only powers of two are used.

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
from PIL import Image

MAX_REDUCTION = 8  # libjpeg's smallest DCT scale is 1/8


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than allowed (decompression-bomb guard); nothing was decoded."""


def check_image_size(width: int, height: int, max_pixels: int | None) -> None:
    """Raise ImageTooLargeError when width x height > max_pixels (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """PIL's lazy open (header only) with the size guard; PIL's own bomb limit also raises ImageTooLargeError."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:  # > 2 x Image.MAX_IMAGE_PIXELS, raised by open before decoding
        raise ImageTooLargeError(str(exn)) from None
    try:
        check_image_size(img.width, img.height, max_pixels)
    except ImageTooLargeError:
        img.close()
        raise
    return img


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
        if self.jpeg:
            check_image_size(self.width, self.height, max_pixels)
        else:
            self._pil = open_image(data, max_pixels)
            self.width, self.height = self._pil.size

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
                self._pil = open_image(self.data)
            else:
                h, w = pixels.shape[:2]
                if (h, w) == (want_h, want_w):
                    return pixels, 1.0 / reduction, 1.0 / reduction
                return pixels, h / self.height, w / self.width
        with self._pil as img:
            return pil_to_uint8(img), 1.0, 1.0


def resize_region(
    pixels_HW3: np.ndarray, top: float, left: float, height: float, width: float, size: tuple[int, int]
) -> torch.Tensor:
    """Resize the box (top, left, height, width) of an RGB image to ``size`` (h, w): uint8 (3, h, w), contiguous.

    The box is in pixels of ``pixels_HW3`` and may be fractional (a box mapped onto a reduced decode). The
    kernel cannot start between pixels: the box starts at its rounded top-left corner (at most half a pixel
    off), and an explicit scale factor keeps its bottom-right corner exact, so the offset fades to zero across
    the output. An integer box is cropped, then resized, as torchvision does. torch's uint8 antialiased bicubic
    (the AVX2 kernel torchvision v2 uses) on a channels-last view: no float copy, and within one grey level
    of PIL's bicubic resize of the same box.
    """
    rows, cols = pixels_HW3.shape[:2]
    r0, c0 = min(round(top), rows - 1), min(round(left), cols - 1)
    bottom, right = top + height, left + width  # exact ends, in (possibly fractional) decoded pixels
    r1, c1 = min(math.ceil(bottom - 1e-6), rows), min(math.ceil(right - 1e-6), cols)
    img_13HW = torch.from_numpy(pixels_HW3).permute(2, 0, 1)[None]  # a channels-last view, no copy
    region = img_13HW[:, :, r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)]
    if (bottom - r0, right - c0) == size == tuple(region.shape[2:]):
        return region[0].contiguous()
    # F.interpolate takes a size or a scale, not both; the op under it takes both (scale = output / input)
    scales = size[0] / max(bottom - r0, 1e-6), size[1] / max(right - c0, 1e-6)
    return torch.ops.aten._upsample_bicubic2d_aa(region, list(size), False, *scales)[0].contiguous()
