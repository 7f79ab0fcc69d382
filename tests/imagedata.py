"""Small, genuinely learnable image datasets rendered with Pillow (:mod:`deploy.host`), and a
real photo."""

from __future__ import annotations

from PIL import Image

from deploy.host import CLASSES, encode, render, write_image_folder  # noqa: F401 - the tests' image helpers


def cat_photo_jpeg() -> bytes:
    """A real photo of a tabby cat ("chelsea", shipped with scikit-image)."""
    from skimage import data

    return encode(Image.fromarray(data.chelsea()), "JPEG", quality=90)
