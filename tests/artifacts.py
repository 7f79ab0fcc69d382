"""Model artifacts made in the test: a model whose answer is known in advance."""

from __future__ import annotations

from pathlib import Path

import torch

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from classifier.models import create_model


def constant_artifact(directory: Path, classes: tuple[str, ...], winner: str) -> Path:
    """A resnet18 that answers ``winner`` for every image, so each model's answers are recognisable."""
    model = create_model("resnet18", len(classes))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[classes.index(winner)] = 10.0
    manifest = Manifest(architecture="resnet18", class_names=classes,
                        preprocessing=Preprocessing(crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3))
    return artifact.save(directory, model, manifest)
