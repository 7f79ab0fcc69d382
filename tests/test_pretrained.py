"""The built-in ImageNet EfficientNet-Lite0 recognises a real photo."""

from __future__ import annotations

import io

import torch
from PIL import Image

from classifier.pretrained import default_model, imagenet_categories
from serve.predictor import Predictor

from imagedata import cat_photo_jpeg

# ImageNet-1k's domestic cat classes (indices 281-285).
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def test_imagenet_class_names_ship_with_torchvision() -> None:
    categories = imagenet_categories()
    assert len(categories) == 1000
    assert CAT_CLASSES <= set(categories[281:286])


def test_default_model_classifies_a_cat_photo_as_a_cat() -> None:
    model, manifest = default_model()
    predictor = Predictor(model, manifest, device=torch.device("cpu"))
    (top,) = predictor.predict([Image.open(io.BytesIO(cat_photo_jpeg())).convert("RGB")], top_k=3)
    assert top[0].label in CAT_CLASSES
    assert sum(p.probability for p in top if p.label in CAT_CLASSES) > 0.5
