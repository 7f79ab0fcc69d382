"""A whole training run: data, model, the epoch loop, the artifact and the reports.

Every metric is printed to stdout as one line, ``metric: <name>=<value> epoch=<n>``, so that
SageMaker metric definitions (``metric: validation_accuracy=([0-9.]+)``) can pick them up.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from classifier.models import EFFICIENTNET_LITE0, create_model, replace_head
from classifier.pretrained import IMAGENET_LITE0_PREPROCESSING, efficientnet_lite0_imagenet
from train.data import load_splits, make_loader
from train.engine import evaluate, train_one_epoch
from train.settings import Hyperparameters, Settings, SettingsError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def emit_metric(name: str, value: float, epoch: int | None = None) -> None:
    suffix = f" epoch={epoch}" if epoch is not None else ""
    print(f"metric: {name}={value:.6f}{suffix}", flush=True)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"hyperparameter device={name!r} but no CUDA device is visible")
    return device


def preprocessing_for(hp: Hyperparameters) -> Preprocessing:
    """Input scaling matches the pretrained weights; sizes follow image_size (crop = 87.5%)."""
    if hp.architecture == EFFICIENTNET_LITE0:
        mean, std, interpolation = (
            IMAGENET_LITE0_PREPROCESSING.mean,
            IMAGENET_LITE0_PREPROCESSING.std,
            IMAGENET_LITE0_PREPROCESSING.interpolation,
        )
    else:
        mean, std, interpolation = IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    return Preprocessing(
        crop_size=hp.image_size,
        resize_size=math.ceil(hp.image_size / 0.875),
        mean=mean,
        std=std,
        interpolation=interpolation,
    )


def build_model(hp: Hyperparameters, num_classes: int) -> nn.Module:
    if not hp.pretrained:
        return create_model(hp.architecture, num_classes)
    if hp.architecture != EFFICIENTNET_LITE0:
        raise SettingsError(
            f"no pretrained weights are shipped for architecture={hp.architecture!r}; "
            f"use architecture={EFFICIENTNET_LITE0!r} or set pretrained=false"
        )
    model = efficientnet_lite0_imagenet()
    replace_head(model, num_classes)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(settings: Settings) -> dict[str, Any]:
    """Train, write the artifact (best validation accuracy, else last epoch) and the reports."""
    hp, paths = settings.hyperparameters, settings.paths
    seed_everything(hp.seed)
    device = select_device(hp.device)
    preprocessing = preprocessing_for(hp)
    splits = load_splits(paths, hp, preprocessing)
    logger.info(
        "data: %d classes, %d training / %s validation / %s test images; device %s",
        len(splits.class_names), len(splits.train),
        len(splits.validation) if splits.validation else "no",
        len(splits.test) if splits.test else "no", device,
    )
    pin = device.type == "cuda"
    train_loader = make_loader(splits.train, hp, shuffle=True, pin_memory=pin)
    model = build_model(hp, len(splits.class_names)).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=hp.learning_rate, momentum=hp.momentum, weight_decay=hp.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=hp.epochs * len(train_loader)
    )
    validation_loader = (
        make_loader(splits.validation, hp, shuffle=False, pin_memory=pin) if splits.validation else None
    )

    history: list[dict[str, Any]] = []
    best_state, best_accuracy, best_epoch = None, -1.0, 0
    for epoch in range(1, hp.epochs + 1):
        record: dict[str, Any] = {"epoch": epoch}
        record["train"] = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device, epoch)
        if validation_loader is not None:
            record["validation"] = evaluate(model, validation_loader, eval_criterion, device)
        for split in ("train", "validation"):
            for name, value in record.get(split, {}).items():
                emit_metric(f"{split}_{name}", value, epoch)
        history.append(record)
        accuracy = record.get("validation", record["train"])["accuracy"]
        if validation_loader is None or accuracy > best_accuracy:
            best_state, best_accuracy, best_epoch = copy.deepcopy(model.state_dict()), accuracy, epoch

    model.load_state_dict(best_state)
    metrics: dict[str, Any] = {"best_epoch": best_epoch, "history": history}
    if validation_loader is not None:
        metrics["validation"] = history[best_epoch - 1]["validation"]
    if splits.test is not None:
        test_loader = make_loader(splits.test, hp, shuffle=False, pin_memory=pin)
        metrics["test"] = evaluate(model, test_loader, eval_criterion, device)
        for name, value in metrics["test"].items():
            emit_metric(f"test_{name}", value)

    manifest = Manifest(
        architecture=hp.architecture,
        class_names=splits.class_names,
        preprocessing=preprocessing,
        training=settings.to_dict(),
        metrics={k: v for k, v in metrics.items() if k != "history"},
    )
    artifact.save(paths.model_dir, model, manifest)
    paths.output_data_dir.mkdir(parents=True, exist_ok=True)
    (paths.output_data_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("artifact written to %s (best epoch %d)", paths.model_dir, best_epoch)
    return metrics
