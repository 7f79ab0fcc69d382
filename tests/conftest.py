from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/imagedata.py and friends

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from classifier.models import create_model

TINY_CLASSES = ("circle", "square", "triangle")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Code under test may configure logging (the entry points do); put it back after each test,
    so no handler outlives the captured stream it writes to."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def tiny_artifact(tmp_path: Path) -> Path:
    """A randomly initialised resnet18 saved in the real artifact format."""
    manifest = Manifest(
        architecture="resnet18",
        class_names=TINY_CLASSES,
        preprocessing=Preprocessing(crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3),
    )
    return artifact.save(tmp_path / "model", create_model("resnet18", len(TINY_CLASSES)), manifest)
