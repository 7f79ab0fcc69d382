"""The splits (from ImageFolders or manifests: see :mod:`train.sources`), checked against each
other, and loaders that can resume mid-epoch.

Unreadable or truncated images are found before training starts and left out (listed in the
report) rather than crashing a long job. Sample order and augmentation are functions of
(seed, epoch, position), so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would have, and each data-parallel process sees its own shard.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from classifier import images
from classifier.artifact import Preprocessing
from classifier.presets import TrainPreset
from train.errors import DataError
from train.settings import Hyperparameters, Paths
from train.sources import LabelledImages, find_manifest, read_manifest, resolve

logger = logging.getLogger(__name__)
SHARED_MEMORY = Path("/dev/shm")
PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker prepares ahead
MEGABYTE = 1024 * 1024


Labelled = ImageFolder | LabelledImages
SPLITS = ("training", "validation", "test")
Rows = list[tuple[str, tuple[str, ...]]]  # (path, labels) of the images a manifest lists


@dataclass(frozen=True)
class Splits:
    class_names: tuple[str, ...]
    train: Labelled
    validation: Labelled | None
    test: Labelled | None
    skipped_files: tuple[str, ...]
    multi_label: bool = False  # targets are a 0/1 vector per image (task=multilabel), else a class index


def is_readable_image(path: str) -> bool:
    """Decode the whole file (at reduced scale for JPEG), which also catches truncation."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return True
    except Exception:
        return False


def _drop_unreadable(dataset: Labelled, split: str, workers: int) -> list[str]:
    paths = [path for path, _ in dataset.samples]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        readable = list(pool.map(is_readable_image, paths, chunksize=64))
    skipped = [path for path, ok in zip(paths, readable) if not ok]
    if skipped:
        dataset.samples = [sample for sample, ok in zip(dataset.samples, readable) if ok]
        dataset.imgs = dataset.samples
        dataset.targets = [target for _, target in dataset.samples]
        logger.warning("%s: skipping %d unreadable image(s), e.g. %s", split, len(skipped), skipped[0])
    if dataset.targets and isinstance(dataset.targets[0], np.ndarray):  # multi-label: every class present somewhere
        counts = np.sum(dataset.targets, axis=0)
        empty = [name for name, count in zip(dataset.classes, counts) if count == 0] if split == "training" else []
    else:
        empty = sorted(set(dataset.classes) - {dataset.classes[t] for t in dataset.targets})
    if empty:
        raise DataError(f"{split} classes with no readable image: {empty}")
    return skipped


def _image_folder(folder: Path, split: str, transform: object, loader: Callable[[str], Image.Image]) -> ImageFolder:
    try:
        return ImageFolder(str(folder), transform=transform, loader=loader)
    except FileNotFoundError as exc:
        # torchvision says "Couldn't find any class folder" or "Found no valid file for the classes".
        raise DataError(f"{split} data in {folder}: {exc}") from None


def _check_same_classes(train: Labelled, other: Labelled, split: str) -> None:
    if other.classes == train.classes:
        return
    missing = sorted(set(train.classes) - set(other.classes))
    extra = sorted(set(other.classes) - set(train.classes))
    raise DataError(
        f"{split} classes differ from training classes: "
        f"missing from {split}: {missing or 'none'}; only in {split}: {extra or 'none'}"
    )


def _download_dir(paths: Paths) -> Path | None:
    """Where images a manifest names in S3 are downloaded: beside the channels (the job's data
    volume on SageMaker) when writable, else the temporary folder."""
    folder = paths.base_dir / "input" / "s3-images"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _read_channels(paths: Paths, hp: Hyperparameters) -> tuple[dict[str, Path], dict[str, Rows]]:
    """Each split's ImageFolder, or its (path, labels) rows from a manifest (a ``split`` column may
    fill several splits from one channel's manifest)."""
    folders: dict[str, Path] = {}
    listed: dict[str, Rows] = {}
    multi_label = hp.task == "multilabel"
    channels = {"training": paths.train_dir, "validation": paths.validation_dir, "test": paths.test_dir}
    for split, channel in channels.items():
        if channel is None:
            continue
        found = find_manifest(channel, hp.data_format)
        if found is None:
            if multi_label:
                raise DataError(f"task=multilabel reads each image's labels from a manifest, and {channel} holds "
                                "none (an ImageFolder gives an image one label: its folder)")
            folders[split] = channel
            continue
        manifest, data_format = found
        logger.info("%s: reading %s (%s)", split, manifest, data_format)
        entries = read_manifest(manifest, data_format, label_attribute=hp.label_attribute, multi_label=multi_label)
        for path, labels, row_split in resolve(channel, entries, download_dir=_download_dir(paths)):
            listed.setdefault(row_split or split, []).append((path, labels))
    for split in listed.keys() & folders.keys():
        raise DataError(f"{split} images come both from a manifest's split column and from the {split} "
                        f"channel ({folders[split]}): use one")
    return folders, listed


def _dataset(split: str, folders: Mapping[str, Path], listed: Mapping[str, Rows],
             transform: object, loader: Callable[[str], Image.Image]) -> Labelled | None:
    if split in folders:
        return _image_folder(folders[split], split, transform, loader)
    rows = listed.get(split)
    if not rows:
        return None
    classes = sorted({label for _, labels in rows for label in labels})
    index = {name: position for position, name in enumerate(classes)}
    return LabelledImages([(path, index[label]) for path, (label,) in rows], classes, transform,  # type: ignore[arg-type]
                          loader)


def _multi_label_dataset(split: str, rows: Rows | None, classes: Sequence[str] | None, transform: object,
                         loader: Callable[[str], Image.Image]) -> LabelledImages | None:
    """Images with a 0/1 target per class (the training split's classes, sorted)."""
    if not rows:
        return None
    if classes is None:
        classes = sorted({label for _, labels in rows for label in labels})
    unknown = sorted({label for _, labels in rows for label in labels} - set(classes))
    if unknown:
        raise DataError(f"{split} labels that no training image has: {unknown}")
    index = {name: position for position, name in enumerate(classes)}
    samples = []
    for path, labels in rows:
        target = np.zeros(len(classes), dtype=np.float32)
        target[[index[label] for label in labels]] = 1.0
        samples.append((path, target))
    return LabelledImages(samples, classes, transform, loader)  # type: ignore[arg-type]


def load_splits(paths: Paths, hp: Hyperparameters, preprocessing: Preprocessing) -> Splits:
    train_transform = TrainPreset(
        crop_size=preprocessing.crop_size,
        resize_size=preprocessing.resize_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
        interpolation=preprocessing.interpolation,
        augmentation=hp.augmentation,
    )
    eval_transform = preprocessing.eval_preset()
    # Images are decoded as the server decodes them (classifier.images): upright by their EXIF
    # orientation, and for evaluation also at the server's reduced JPEG scale, so the accuracy
    # reported is the one served. Training's random crops see the full resolution.
    eval_loader = functools.partial(images.load, min_side=preprocessing.resize_size)
    folders, listed = _read_channels(paths, hp)
    multi_label = hp.task == "multilabel"

    def dataset(split: str, transform: object, loader: Callable[[str], Image.Image],
                classes: Sequence[str] | None = None) -> Labelled | None:
        if multi_label:
            return _multi_label_dataset(split, listed.get(split), classes, transform, loader)
        return _dataset(split, folders, listed, transform, loader)

    train = dataset("training", train_transform, images.load)
    if train is None:
        raise DataError(f"the manifest in {paths.train_dir} lists no training images (its split column names "
                        f"only: {', '.join(sorted(listed))})")
    if multi_label and not train.classes:
        raise DataError(f"the training images in {paths.train_dir} have no labels at all")
    if not multi_label and len(train.classes) < 2:
        raise DataError(f"training data in {paths.train_dir} has {len(train.classes)} class; need at least 2")
    skipped = _drop_unreadable(train, "training", hp.workers)
    evaluated = {}
    for split in ("validation", "test"):
        held_out = dataset(split, eval_transform, eval_loader, train.classes)
        if held_out is not None:
            if not multi_label:  # multi-label splits are indexed by the training classes already
                _check_same_classes(train, held_out, split)
            skipped += _drop_unreadable(held_out, split, hp.workers)
            evaluated[split] = held_out
    return Splits(tuple(train.classes), train, evaluated.get("validation"), evaluated.get("test"), tuple(skipped),
                  multi_label=multi_label)


class SeededDataset(Dataset):
    """Wraps a dataset so that each item's random augmentation is seeded by its sampler."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> object:
        index, seed = item
        torch.manual_seed(seed)
        return self.dataset[index]


class ShardSampler(Sampler[tuple[int, int]]):
    """This process's share of each epoch, in an order fixed by (seed, epoch).

    Like ``DistributedSampler`` (padding so every process gets the same number of samples),
    plus a start offset for resuming mid-epoch, and a per-sample augmentation seed.
    """

    def __init__(self, length: int, *, rank: int, world_size: int, shuffle: bool, seed: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start = 0, 0
        self.per_process = -(-length // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this process's ``start``-th sample on."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_process - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator) if self.shuffle else torch.arange(self.length)
        order = order.repeat(-(-self.per_process * self.world_size // self.length))[: self.per_process * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for position in range(self.start, self.per_process):
            yield mine[position], (base + mine[position]) % (2**63)


def shared_memory_free(folder: Path = SHARED_MEMORY) -> int | None:
    """Free bytes in the shared-memory file system, or None when there is none to measure."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


@dataclass(frozen=True)
class Transport:
    """How loader workers hand batches to the training process.

    PyTorch's loader workers put every batch in shared memory (``/dev/shm``). Docker gives a
    container 64 MB of it unless told otherwise, and SageMaker's local mode asks for no more, so
    default-sized batches of 224-pixel images (38 MB each, a few in flight per worker) do not fit
    and the job dies in its first epoch. When they would not fit, workers send batches as NumPy
    arrays through their pipes instead: one more copy per batch, and no shared memory at all.
    """

    workers: int
    through_pipes: bool

    @classmethod
    def choose(cls, *, workers: int, batch_bytes: int, shared_free: int | None) -> Transport:
        in_flight = (workers * PREFETCH_FACTOR + 1) * batch_bytes
        # Half the free space at most: evaluation loaders and a second process may need some too.
        through_pipes = workers > 0 and shared_free is not None and in_flight > shared_free // 2
        return cls(workers=workers, through_pipes=through_pipes)

    def describe(self, batch_bytes: int, shared_free: int | None) -> str:
        if self.workers == 0:
            return "images are loaded in the training process (workers=0)"
        room = "unknown" if shared_free is None else f"{shared_free / MEGABYTE:.0f} MB"
        if not self.through_pipes:
            return f"{self.workers} loader worker(s) pass batches in shared memory (/dev/shm free: {room})"
        return (f"{self.workers} loader worker(s) pass batches through pipes: /dev/shm has {room} free and "
                f"{self.workers * PREFETCH_FACTOR + 1} batches of {batch_bytes / MEGABYTE:.0f} MB would be in flight "
                "(a larger --shm-size lets them use shared memory)")


def collate_arrays(samples: Sequence[tuple[object, ...]]) -> tuple[np.ndarray, ...]:
    """A batch as NumPy arrays, which cross process boundaries as bytes, not shared memory."""
    return tuple(
        np.stack([np.asarray(field) for field in fields]) for fields in zip(*samples)
    )


class ArrayBatches:
    """Iterates a loader of NumPy batches as tensors (pinned for a GPU when asked)."""

    def __init__(self, loader: DataLoader, *, pin_memory: bool) -> None:
        self.loader = loader
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for arrays in self.loader:
            tensors = tuple(torch.from_numpy(array) for array in arrays)
            yield tuple(t.pin_memory() for t in tensors) if self.pin_memory else tensors


def _batch_bytes(hp: Hyperparameters) -> int:
    return hp.batch_size * 3 * hp.image_size * hp.image_size * 4  # float32 images dominate


def _processes_on_this_host(hp: Hyperparameters) -> int:
    if hp.processes_per_host > 0:
        return hp.processes_per_host
    return max(1, torch.cuda.device_count()) if hp.device in ("auto", "cuda") and torch.cuda.is_available() else 1


def make_loader(dataset: Dataset, hp: Hyperparameters, *, pin_memory: bool,
                **options: object) -> DataLoader | ArrayBatches:
    """A DataLoader over ``dataset`` whose workers fit the shared memory this machine has."""
    batch_bytes = _batch_bytes(hp)
    shared_free = shared_memory_free()
    if shared_free is not None:
        shared_free //= _processes_on_this_host(hp)  # every local process's loaders share /dev/shm
    transport = Transport.choose(workers=hp.workers, batch_bytes=batch_bytes, shared_free=shared_free)
    logger.info("data loading: %s", transport.describe(batch_bytes, shared_free))
    pipes = transport.through_pipes
    loader = DataLoader(dataset, batch_size=hp.batch_size, num_workers=transport.workers,
                        collate_fn=collate_arrays if pipes else None, pin_memory=pin_memory and not pipes,
                        **options)  # type: ignore[arg-type]
    return ArrayBatches(loader, pin_memory=pin_memory) if pipes else loader


def train_loader(dataset: Dataset, sampler: ShardSampler, hp: Hyperparameters, *,
                 pin_memory: bool) -> DataLoader | ArrayBatches:
    return make_loader(
        SeededDataset(dataset), hp, pin_memory=pin_memory,
        sampler=sampler,
        persistent_workers=False,  # the sampler changes between epochs
        drop_last=False,
    )


def eval_loader(dataset: Dataset, hp: Hyperparameters, *, rank: int, world_size: int,
                pin_memory: bool) -> DataLoader | ArrayBatches:
    """Evaluation is sharded without padding, so summed metrics count every image once."""
    indices: Sequence[int] = range(rank, len(dataset), world_size)  # type: ignore[arg-type]
    return make_loader(torch.utils.data.Subset(dataset, list(indices)), hp, pin_memory=pin_memory, shuffle=False)
