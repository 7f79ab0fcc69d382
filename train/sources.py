"""Where a channel's labelled images come from: an ImageFolder tree, or a manifest listing them.

A channel holding one manifest file at its top level is read through it; otherwise it is an
ImageFolder (``<class>/<image>``). ``data_format`` overrides the choice. Manifests:

- **CSV** (``.csv``) with a header: an image column (``path``, ``image``, ``file``, ``filename``,
  ``key`` or ``source-ref``), a label column (``label``, ``class`` or ``class_name``) and
  optionally ``split``.
- **JSON Lines** (``.jsonl``, ``.manifest``): one object a line with the same keys.
- **Ground Truth augmented manifest** (JSON Lines whose records have ``source-ref``): the class
  name is ``<attribute>-metadata.class-name``; the label attribute is ``label_attribute``, or
  the one attribute whose ``-metadata`` holds a ``class-name``.

An image is named by a path relative to the channel, or by an ``s3://`` URI: that is the file at
the object's key under the channel when the images were copied there along with the manifest
(``aws s3 sync``), else the object is downloaded before training starts. A ``split`` column
(``train``, ``validation``, ``test`` and their usual spellings) lets one manifest hold every
split. Rows that name no image or no label are errors naming the line; files that are missing or
unreadable are skipped and listed, as for an ImageFolder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader

from train.settings import MANIFEST_SUFFIXES, SettingsError, split_s3_uri

logger = logging.getLogger(__name__)
IMAGE_KEYS = ("path", "image", "file", "filename", "key", "source-ref")
LABEL_KEYS = ("label", "class", "class_name")
SPLIT_NAMES = {"train": "training", "training": "training", "validation": "validation", "valid": "validation",
               "val": "validation", "test": "test"}
DOWNLOAD_THREADS = 16


class DataError(SettingsError):
    """The training data cannot be used as given."""


@dataclass(frozen=True)
class Entry:
    """One labelled image as a manifest names it."""

    image: str  # a path relative to the channel, or an s3:// URI
    label: str
    split: str | None  # training, validation or test; None: the channel's own split
    line: int


class LabelledImages(Dataset):
    """Images and their class indices, read as torchvision's ImageFolder reads them (same loader,
    same ``samples``, ``targets`` and ``classes``), from any source."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Callable | None) -> None:
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.classes = list(classes)
        self.transform = transform

    @property
    def imgs(self) -> list[tuple[str, int]]:
        return self.samples

    @imgs.setter
    def imgs(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = default_loader(path)
        return (self.transform(image) if self.transform is not None else image), target


def find_manifest(folder: Path, data_format: str) -> tuple[Path, str] | None:
    """The channel's manifest and its format, or None for an ImageFolder."""
    if data_format == "folder":
        return None
    found = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES)
    if len(found) > 1:
        raise DataError(f"{folder} holds several manifests ({', '.join(path.name for path in found)}): "
                        "keep one per channel")
    if not found:
        if data_format != "auto":
            raise DataError(f"data_format={data_format} but {folder} holds no manifest "
                            f"({', '.join(sorted(MANIFEST_SUFFIXES))} file at its top level)")
        return None
    manifest = found[0]
    return manifest, MANIFEST_SUFFIXES[manifest.suffix.lower()] if data_format == "auto" else data_format


def _first_key(record: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in record), None)


def _label_attribute(record: Mapping[str, Any], chosen: str, where: str) -> str:
    if chosen:
        if chosen not in record and f"{chosen}-metadata" not in record:
            raise DataError(f"{where}: no label attribute {chosen!r} (label_attribute); keys: {sorted(record)}")
        return chosen
    candidates = sorted(key.removesuffix("-metadata") for key, value in record.items()
                        if key.endswith("-metadata") and isinstance(value, dict) and "class-name" in value)
    if len(candidates) != 1:
        raise DataError(f"{where}: found {len(candidates)} label attributes with a class-name "
                        f"({', '.join(candidates) or 'none'}); name one with the label_attribute hyperparameter")
    return candidates[0]


def _split(value: Any, where: str) -> str | None:
    if value in (None, ""):
        return None
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise DataError(f"{where}: split {value!r} is none of {', '.join(sorted(SPLIT_NAMES))}")
    return split


def _entry(record: Mapping[str, Any], line: int, where: str, *, ground_truth: bool, label_attribute: str) -> Entry:
    image_key = "source-ref" if ground_truth else _first_key(record, IMAGE_KEYS)
    image = record.get(image_key) if image_key else None
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: no image ({'source-ref' if ground_truth else ' or '.join(IMAGE_KEYS)})")
    if ground_truth:
        attribute = _label_attribute(record, label_attribute, where)
        metadata = record.get(f"{attribute}-metadata")
        label = metadata.get("class-name") if isinstance(metadata, dict) else None
    else:
        label_key = _first_key(record, LABEL_KEYS)
        label = record.get(label_key) if label_key else None
    if label is None or str(label).strip() == "":
        raise DataError(f"{where}: no label ({'<attribute>-metadata.class-name' if ground_truth else ' or '.join(LABEL_KEYS)})")
    return Entry(image.strip(), str(label).strip(), _split(record.get("split"), where), line)


def _records(manifest: Path, data_format: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with manifest.open(newline="" if data_format == "csv" else None, encoding="utf-8-sig") as file:
        if data_format == "csv":
            for line, row in enumerate(csv.DictReader(file), start=2):
                yield line, {key.strip().lower(): value for key, value in row.items() if key is not None}
            return
        for line, text in enumerate(file, start=1):
            if text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{manifest.name} line {line}: not JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{manifest.name} line {line}: expected a JSON object")
                yield line, record


def read_manifest(manifest: Path, data_format: str, *, label_attribute: str = "") -> list[Entry]:
    entries = []
    for line, record in _records(manifest, data_format):
        where = f"{manifest.name} line {line}"
        ground_truth = data_format == "augmented-manifest" or (data_format == "jsonl" and "source-ref" in record)
        entries.append(_entry(record, line, where, ground_truth=ground_truth, label_attribute=label_attribute))
    if not entries:
        raise DataError(f"{manifest} lists no images")
    return entries


def _local_path(channel: Path, image: str) -> Path | None:
    """Where a manifest's image is on disk, or None when it must be downloaded."""
    if not image.startswith("s3://"):
        return channel / image.lstrip("/")
    _, key = split_s3_uri(image)
    copied = channel / key.rstrip("/")
    return copied if copied.is_file() else None


def _download(uris: Sequence[str], folder: Path, s3: Any) -> dict[str, Path]:
    """Download each object once into ``folder`` (a missing or forbidden one stays missing and is
    skipped like an unreadable file)."""
    def fetch(uri: str) -> tuple[str, Path]:
        bucket, key = split_s3_uri(uri)
        key = key.rstrip("/")
        target = folder / bucket / key
        if target.is_file():  # downloaded by another process on this host (each file appears whole)
            return uri, target
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            s3.download_file(bucket, key, str(target))
        except Exception as exc:  # noqa: BLE001 - any failure leaves the image out, listed
            logger.warning("could not download %s: %s", uri, exc)
        return uri, target

    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
        return dict(pool.map(fetch, sorted(set(uris))))


def resolve(channel: Path, entries: Sequence[Entry], *,
            download_dir: Path | None = None) -> list[tuple[str, str, str | None]]:
    """(path on disk, label, split) for each entry, downloading the S3 images not in the channel."""
    local = [_local_path(channel, entry.image) for entry in entries]
    remote = [entry.image for entry, path in zip(entries, local) if path is None]
    downloaded: dict[str, Path] = {}
    if remote:
        import boto3

        folder = download_dir or Path(tempfile.mkdtemp(prefix="images-", dir=os.environ.get("TMPDIR")))
        logger.info("downloading %d image(s) named by the manifest from S3 into %s", len(set(remote)), folder)
        downloaded = _download(remote, folder, boto3.client("s3"))
    return [(str(path if path is not None else downloaded[entry.image]), entry.label, entry.split)
            for entry, path in zip(entries, local)]
