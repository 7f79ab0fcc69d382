"""Images in, logits out. Knows nothing of HTTP.

``preprocess`` turns one image into the network's input (run in parallel, off the event loop);
``infer`` runs one forward pass over a stacked batch (run on one inference thread).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from classifier import artifact
from classifier.artifact import ArtifactError, Manifest
from classifier.pretrained import default_model
from serve import codec

logger = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Predictor:
    def __init__(self, model: nn.Module, manifest: Manifest, device: torch.device, *, half: bool | None = None) -> None:
        self.device = device
        self.half = device.type == "cuda" if half is None else half and device.type == "cuda"
        self.channels_last = device.type == "cuda"
        model = model.to(device).eval()
        if self.half:
            model = model.half()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.manifest = manifest
        self.preprocessing = manifest.preprocessing.eval_preset()
        crop = manifest.preprocessing.crop_size
        self.input_shape = (3, crop, crop)
        self.resize_size = manifest.preprocessing.resize_size  # the short side preprocessing resizes to

    @classmethod
    def load(cls, model_dir: Path, *, allow_default: bool, device: str = "auto", half: bool | None = None) -> Predictor:
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
        return cls(model, manifest, target, half=half)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessing(image)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> np.ndarray:
        """Logits (float32, on the CPU) for a batch of preprocessed inputs."""
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.half:
            batch = batch.half()
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.model(batch).float().cpu().numpy()

    def predict(self, images: Sequence[Image.Image], top_k: int) -> list[list[codec.Prediction]]:
        """Ranked predictions for ``images`` in one pass (for in-process use and tests)."""
        logits = self.infer(torch.stack([self.preprocess(image) for image in images]))
        return codec.top_k(logits, self.class_names, top_k)

    def warm_up(self) -> None:
        """One inference on a blank image, so the first request does not pay for lazy setup."""
        size = self.manifest.preprocessing.resize_size
        self.infer(self.preprocess(Image.new("RGB", (size, size)))[None])
