"""Small, genuinely learnable image datasets rendered with Pillow (:mod:`deploy.host`), and a
real photo."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from deploy.host import CLASSES, encode, render, write_image_folder  # noqa: F401 - the tests' image helpers


def write_shape_splits(root: Path) -> Path:
    """``train/`` (30 per class), ``valid/`` and ``test/`` (10 each): the learnable set the
    training tests hold every data source to."""
    write_image_folder(root / "train", 30, seed=1)
    write_image_folder(root / "valid", 10, seed=2)
    write_image_folder(root / "test", 10, seed=3)
    return root


def cat_photo_jpeg() -> bytes:
    """A real photo of a tabby cat ("chelsea", shipped with scikit-image)."""
    from skimage import data

    return encode(Image.fromarray(data.chelsea()), "JPEG", quality=90)
