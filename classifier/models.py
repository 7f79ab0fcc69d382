"""Architecture factory: every network an artifact can name, built from its name alone."""

from __future__ import annotations

import torchvision
from torch import nn

# EfficientNet-Lite0 ported from TensorFlow: timm's "tf_" variant reproduces TF's "same"
# padding and batch-norm epsilon, which the shipped ImageNet weights were trained with.
EFFICIENTNET_LITE0 = "efficientnet_lite0"
_TIMM_NAMES = {EFFICIENTNET_LITE0: "tf_efficientnet_lite0"}
TIMM_PREFIX = "timm/"  # any timm model by name: "timm/convnext_tiny"


class UnknownArchitectureError(ValueError):
    """The requested architecture is neither built in nor a torchvision classifier."""


def available_architectures() -> list[str]:
    """Names accepted by :func:`create_model` (besides ``timm/<any timm model>``)."""
    return sorted({*_TIMM_NAMES, *torchvision.models.list_models(module=torchvision.models)})


def create_model(architecture: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier with ``num_classes`` outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if architecture in _TIMM_NAMES or architecture.startswith(TIMM_PREFIX):
        # Only here: a server running a model's exported graph never builds a network, and timm
        # would add a third of a second to its start.
        import timm
    if architecture in _TIMM_NAMES:
        return timm.create_model(_TIMM_NAMES[architecture], pretrained=False, num_classes=num_classes)
    if architecture.startswith(TIMM_PREFIX):
        name = architecture.removeprefix(TIMM_PREFIX)
        if not timm.is_model(name):
            raise UnknownArchitectureError(f"unknown timm architecture {name!r} (timm.list_models() names them)")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownArchitectureError(
            f"unknown architecture {architecture!r}; choose one of: "
            + ", ".join(available_architectures())
        )
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def _head_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute or index) of the final linear layer."""
    for attribute in ("fc", "classifier", "head", "heads"):
        child = getattr(model, attribute, None)
        if isinstance(child, nn.Linear):
            return model, attribute
        if isinstance(child, nn.Sequential):
            for index in reversed(range(len(child))):
                if isinstance(child[index], nn.Linear):
                    return child, str(index)
    raise ValueError(f"cannot find the classification head of {type(model).__name__}")


def classification_head(model: nn.Module) -> nn.Module:
    """The final linear layer (the part that is replaced and trained when fine-tuning)."""
    parent, slot = _head_slot(model)
    return parent[int(slot)] if slot.isdigit() else getattr(parent, slot)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the final linear layer for a fresh one with ``num_classes`` outputs; returns it."""
    parent, slot = _head_slot(model)
    old = classification_head(model)
    new = nn.Linear(old.in_features, num_classes)
    if slot.isdigit():
        parent[int(slot)] = new
    else:
        setattr(parent, slot, new)
    return new
