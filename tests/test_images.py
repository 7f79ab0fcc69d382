"""One decode for training and serving (classifier.images): the same file gives the same tensor
in training's evaluation and in the server, and a sideways-stored phone photo is upright in both."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classifier import images
from classifier.artifact import Preprocessing
from serve import codec
from train.data import load_splits
from train.settings import Hyperparameters, Paths

PREPROCESSING = Preprocessing(crop_size=224, resize_size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
ORIENTATION = 0x0112


def asymmetric(width: int, height: int) -> Image.Image:
    """Noise with a red band along the top edge: any rotation or flip shows."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 8] = (255, 0, 0)
    return Image.fromarray(pixels)


def rotated_jpeg() -> bytes:
    """Stored sideways, as a phone does: the pixels turned 90°, EXIF orientation 6 to turn them back."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    asymmetric(400, 300).rotate(90, expand=True).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


FILES = {
    "rotated.jpg": rotated_jpeg,
    "large.jpg": lambda: encoded(asymmetric(2400, 1800), "JPEG", quality=90),  # decoded at 1/4 scale
    "plain.png": lambda: encoded(asymmetric(500, 380), "PNG"),
}


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each file as a validation image (class "a"); the training split needs two classes."""
    root = tmp_path_factory.mktemp("images")
    for split in ("train", "valid"):
        for class_name in ("a", "b"):
            (root / split / class_name).mkdir(parents=True)
    for name, make in FILES.items():
        (root / "valid" / "a" / name).write_bytes(make())
        (root / "train" / "a" / name).write_bytes(make())
    asymmetric(64, 64).save(root / "valid" / "b" / "other.png")
    asymmetric(64, 64).save(root / "train" / "b" / "other.png")
    return root


def served(body: bytes) -> torch.Tensor:
    """The server's tensor for a body: its decode (at the resize size, as by default), its preprocessing."""
    image = codec.decode_image(body, max_pixels=40_000_000, min_side=PREPROCESSING.resize_size)
    return PREPROCESSING.eval_preset()(image)


def test_training_evaluates_the_tensor_the_server_answers_for(channels: Path, tmp_path: Path) -> None:
    paths = Paths(base_dir=tmp_path, model_dir=tmp_path / "model", output_dir=tmp_path / "out",
                  output_data_dir=tmp_path / "out" / "data", checkpoint_dir=tmp_path / "checkpoints",
                  train_dir=channels / "train", validation_dir=channels / "valid", test_dir=None, pretrained_dir=None,
                  checkpoint_s3_uri=None)
    splits = load_splits(paths, Hyperparameters(workers=0), PREPROCESSING)
    assert splits.validation is not None
    for index, (path, _) in enumerate(splits.validation.samples):
        name = Path(path).name
        if name in FILES:
            tensor, _ = splits.validation[index]
            assert torch.equal(tensor, served(Path(path).read_bytes())), name


def test_a_sideways_photo_is_upright_for_training_and_serving(channels: Path) -> None:
    upright = np.asarray(images.load(channels / "train" / "a" / "rotated.jpg"))
    assert upright.shape == (300, 400, 3)  # turned back by its EXIF orientation
    top, bottom = upright[:30].mean(axis=(0, 1)), upright[-30:].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 200  # the red band is at the top again
    served_image = codec.decode_image(rotated_jpeg(), max_pixels=40_000_000)
    assert np.array_equal(np.asarray(served_image), upright)
