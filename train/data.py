"""ImageFolder datasets for the train / validation / test splits, checked against each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from classifier.artifact import Preprocessing
from classifier.presets import TrainPreset
from train.settings import Hyperparameters, Paths, SettingsError


class DataError(SettingsError):
    """The training data cannot be used as given."""


@dataclass(frozen=True)
class Splits:
    class_names: tuple[str, ...]
    train: ImageFolder
    validation: ImageFolder | None
    test: ImageFolder | None


def _image_folder(folder: Path, split: str, transform: object) -> ImageFolder:
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as exc:
        # torchvision says "Couldn't find any class folder" or "Found no valid file for the classes".
        raise DataError(f"{split} data in {folder}: {exc}") from None


def _check_same_classes(train: ImageFolder, other: ImageFolder, split: str) -> None:
    if other.classes == train.classes:
        return
    missing = sorted(set(train.classes) - set(other.classes))
    extra = sorted(set(other.classes) - set(train.classes))
    raise DataError(
        f"{split} classes differ from training classes: "
        f"missing from {split}: {missing or 'none'}; only in {split}: {extra or 'none'}"
    )


def load_splits(paths: Paths, hp: Hyperparameters, preprocessing: Preprocessing) -> Splits:
    train_transform = TrainPreset(
        crop_size=preprocessing.crop_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
        interpolation=preprocessing.interpolation,
    )
    eval_transform = preprocessing.eval_preset()
    train = _image_folder(paths.train_dir, "training", train_transform)
    if len(train.classes) < 2:
        raise DataError(f"training data in {paths.train_dir} has {len(train.classes)} class; need at least 2")
    evaluated = {}
    for split, folder in (("validation", paths.validation_dir), ("test", paths.test_dir)):
        if folder is not None:
            evaluated[split] = _image_folder(folder, split, eval_transform)
            _check_same_classes(train, evaluated[split], split)
    return Splits(tuple(train.classes), train, evaluated.get("validation"), evaluated.get("test"))


def make_loader(dataset: Dataset, hp: Hyperparameters, *, shuffle: bool, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=hp.batch_size,
        shuffle=shuffle,
        num_workers=hp.workers,
        pin_memory=pin_memory,
        persistent_workers=hp.workers > 0,
        drop_last=False,
    )
