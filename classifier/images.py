"""Decoding an image the one way training and serving both do: a large JPEG at a reduced scale
(never below the model's resize size), the EXIF orientation applied, 16-bit greyscale scaled to
8 bits, RGB. A phone photo stored sideways with an orientation tag is learned and answered
upright, and what training evaluates is what the server answers for the same file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def reduce_jpeg(image: Image.Image, min_side: int | None) -> None:
    """Before decoding: have a JPEG at least twice ``min_side`` on its short side decoded straight
    from its DCT coefficients at 1/2, 1/4 or 1/8 scale, never below ``min_side``. A 12-megapixel
    photo then decodes several times faster, and the resize to ``min_side`` sees nearly the same
    pixels. ``image.size`` becomes the size that will be decoded."""
    width, height = image.size
    if min_side and image.format == "JPEG" and min(width, height) >= 2 * min_side:
        scale = min_side / min(width, height)
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def upright_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image into an upright 8-bit RGB image (Pillow's errors pass through)."""
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white.
        array = np.asarray(image, dtype=np.float32)
        array *= 255.0 / (float(array.max()) or 1.0)
        image = Image.fromarray(np.rint(array, out=array).astype(np.uint8))
        del array
    return image.convert("RGB")


def load(path: str | Path, min_side: int | None = None) -> Image.Image:
    """An image file as the server decodes the same bytes (``min_side``: see :func:`reduce_jpeg`)."""
    with Image.open(path) as image:
        reduce_jpeg(image, min_side)
        return upright_rgb(image)
