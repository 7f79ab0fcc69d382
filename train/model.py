"""The network a job trains, built from the hyperparameters: its architecture, its starting weights
(shipped ImageNet weights, a file of the user's, or none), its input preprocessing, and the
optimizer and learning-rate schedule that train it."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from classifier.artifact import Preprocessing
from classifier.models import EFFICIENTNET_LITE0, classification_head, create_model, replace_head
from classifier.pretrained import IMAGENET_LITE0_PREPROCESSING, efficientnet_lite0_imagenet
from train.errors import SettingsError
from train.settings import Hyperparameters, Paths

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def preprocessing_for(hp: Hyperparameters) -> Preprocessing:
    """Input scaling matches the pretrained weights; sizes follow image_size (crop = 87.5%)."""
    lite0 = hp.architecture == EFFICIENTNET_LITE0
    prep = IMAGENET_LITE0_PREPROCESSING
    return Preprocessing(
        crop_size=hp.image_size,
        resize_size=math.ceil(hp.image_size / 0.875),
        mean=prep.mean if lite0 else IMAGENET_MEAN,
        std=prep.std if lite0 else IMAGENET_STD,
        interpolation=prep.interpolation if lite0 else "bilinear",
    )


def weights_source(hp: Hyperparameters, paths: Paths) -> Path | None:
    """A user-supplied state dict: the weights_file hyperparameter, else the `pretrained` channel."""
    if hp.weights_file:
        path = Path(hp.weights_file)
        if not path.is_absolute() and paths.pretrained_dir is not None:
            path = paths.pretrained_dir / path
        if not path.is_file():
            raise SettingsError(f"hyperparameter weights_file={hp.weights_file!r}: no such file")
        return path
    if paths.pretrained_dir is not None:
        files = sorted(p for p in paths.pretrained_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise SettingsError(f"the pretrained channel {paths.pretrained_dir} holds no weights file "
                                f"({', '.join(WEIGHT_SUFFIXES)})")
        return files[0]
    return None


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict, leaving out the head when its shape differs (other class count)."""
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    head_ids = {id(p) for p in classification_head(model).parameters()}
    head = {name for name, p in model.named_parameters() if id(p) in head_ids}
    missing = [k for k in own if k not in fitting and k not in head]
    if missing:
        raise SettingsError(f"weights in {path} do not fit the model: {len(missing)} tensors missing "
                            f"or of another shape, e.g. {missing[:3]}")
    model.load_state_dict(fitting, strict=False)
    logger.info("initialised from %s (%d of %d tensors)", path, len(fitting), len(own))


def build_model(hp: Hyperparameters, paths: Paths, num_classes: int) -> nn.Module:
    source = weights_source(hp, paths)
    if source is not None:
        model = create_model(hp.architecture, num_classes)
        load_backbone_weights(model, source)
    elif not hp.pretrained:
        model = create_model(hp.architecture, num_classes)
    elif hp.architecture == EFFICIENTNET_LITE0:
        model = efficientnet_lite0_imagenet()
        replace_head(model, num_classes)
    else:
        raise SettingsError(
            f"no pretrained weights are shipped for architecture={hp.architecture!r}; "
            f"use architecture={EFFICIENTNET_LITE0!r}, supply weights (weights_file or a "
            "`pretrained` channel) or set pretrained=false"
        )
    if hp.freeze_backbone:
        head = set(classification_head(model).parameters())
        for parameter in model.parameters():
            parameter.requires_grad = parameter in head
    return model


def make_optimizer(hp: Hyperparameters, model: nn.Module) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    return torch.optim.SGD(parameters, lr=hp.learning_rate, momentum=hp.momentum, weight_decay=hp.weight_decay)


def make_scheduler(hp: Hyperparameters, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warm-up, then cosine, step or constant."""
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    total = hp.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if hp.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if hp.lr_schedule == "step":
            return hp.lr_gamma ** (step // (hp.lr_step_size * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
