"""Architecture factory: every network an artifact can name, built from its name alone."""

from __future__ import annotations

import timm
import torchvision
from torch import nn

# EfficientNet-Lite0 ported from TensorFlow: timm's "tf_" variant reproduces TF's "same"
# padding and batch-norm epsilon, which the shipped ImageNet weights were trained with.
EFFICIENTNET_LITE0 = "efficientnet_lite0"
_TIMM_NAMES = {EFFICIENTNET_LITE0: "tf_efficientnet_lite0"}


class UnknownArchitectureError(ValueError):
    """The requested architecture is neither built in nor a torchvision classifier."""


def available_architectures() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted({*_TIMM_NAMES, *torchvision.models.list_models(module=torchvision.models)})


def create_model(architecture: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier with ``num_classes`` outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if architecture in _TIMM_NAMES:
        return timm.create_model(_TIMM_NAMES[architecture], pretrained=False, num_classes=num_classes)
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownArchitectureError(
            f"unknown architecture {architecture!r}; choose one of: "
            + ", ".join(available_architectures())
        )
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the final linear layer for a fresh one with ``num_classes`` outputs."""
    if hasattr(model, "reset_classifier"):  # timm models
        model.reset_classifier(num_classes)
        return
    for attribute in ("fc", "classifier", "head", "heads"):
        parent = getattr(model, attribute, None)
        if parent is None:
            continue
        if isinstance(parent, nn.Linear):
            setattr(model, attribute, nn.Linear(parent.in_features, num_classes))
            return
        if isinstance(parent, nn.Sequential):
            for index in reversed(range(len(parent))):
                if isinstance(parent[index], nn.Linear):
                    parent[index] = nn.Linear(parent[index].in_features, num_classes)
                    return
    raise ValueError(f"cannot find the classification head of {type(model).__name__}")
