"""Small, genuinely learnable image datasets rendered with Pillow, and a real photo."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

# Each class is a shape in a colour family; position, size, hue and background vary per image.
CLASSES = {
    "circle": (220, 40, 40),
    "square": (40, 180, 40),
    "triangle": (40, 60, 220),
}


def render(class_name: str, rng: random.Random, size: int = 64) -> Image.Image:
    background = tuple(rng.randint(90, 170) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    base = CLASSES[class_name]
    colour = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in base)
    extent = rng.randint(size // 3, size * 3 // 4)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if class_name == "circle":
        draw.ellipse(box, fill=colour)
    elif class_name == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image


def write_image_folder(root: Path, per_class: int, *, seed: int, size: int = 64) -> Path:
    """``root/<class>/<n>.png`` for every class in :data:`CLASSES`."""
    rng = random.Random(seed)
    for class_name in CLASSES:
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            render(class_name, rng, size).save(folder / f"{index:03d}.png")
    return root


def encode(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def cat_photo_jpeg() -> bytes:
    """A real photo of a tabby cat ("chelsea", shipped with scikit-image)."""
    from skimage import data

    return encode(Image.fromarray(data.chelsea()), "JPEG", quality=90)
