"""Images in, ranked class probabilities out. Knows nothing of HTTP."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from classifier import artifact
from classifier.artifact import ArtifactError, Manifest
from classifier.pretrained import default_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "index": self.index, "probability": self.probability}


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Predictor:
    def __init__(self, model: nn.Module, manifest: Manifest, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.manifest = manifest
        self.device = device
        self.preprocess = manifest.preprocessing.eval_preset()

    @classmethod
    def load(cls, model_dir: Path, *, allow_default: bool, device: str = "auto") -> Predictor:
        """The artifact in ``model_dir``, else (if allowed) the built-in ImageNet model."""
        target = select_device(device)
        if artifact.is_artifact(model_dir):
            model, manifest = artifact.load(model_dir, device=target)
            logger.info("loaded %s with %d classes from %s", manifest.architecture, manifest.num_classes, model_dir)
        elif allow_default:
            model, manifest = default_model()
            logger.info("no artifact in %s; serving the built-in ImageNet %s", model_dir, manifest.architecture)
        else:
            raise ArtifactError(f"no model artifact in {model_dir} and the default model is disabled")
        return cls(model, manifest, target)

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image], top_k: int) -> list[list[Prediction]]:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        probabilities = self.model(batch).float().softmax(dim=1)
        k = min(top_k, probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        names = self.manifest.class_names
        return [
            [Prediction(names[i], i, round(p, 6)) for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]

    def warm_up(self) -> None:
        """One inference on a blank image, so the first request does not pay for lazy setup."""
        size = self.manifest.preprocessing.resize_size
        self.predict([Image.new("RGB", (size, size))], top_k=1)
