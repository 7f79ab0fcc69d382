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
- **ManifestFile** (``.json``, ``.manifest``), as SageMaker's ``S3DataType=ManifestFile`` reads
  it: a JSON list, ``[{"prefix": "s3://bucket/data/"}, "beagle/1.jpg", ...]``. Each key is
  ``<class>/<image>`` or ``<split>/<class>/<image>`` below the prefix: the class is the folder
  the image is in, as in an ImageFolder.

With ``task=multilabel`` a record holds any number of labels: a JSON list (``"labels": ["cat",
"dog"]``, or ``[]`` for none), a string or CSV cell with them separated by ``|`` or ``;``, or a
Ground Truth multi-label job's class ids and their ``-metadata.class-map``.

An image is named by a path relative to the channel, or by an ``s3://`` URI: that is the file at
the object's key (or the end of it) under the channel when the images were copied there along
with the manifest (``aws s3 sync``), else the object is downloaded before training starts. A ``split`` column
(``train``, ``validation``, ``test`` and their usual spellings) lets one manifest hold every
split. Rows that name no image or no label are errors naming the line (Ground Truth's records of
objects its workers could not label are left out); files that are missing or unreadable are
skipped and listed, as for an ImageFolder.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader

from train.errors import DataError

logger = logging.getLogger(__name__)
IMAGE_KEYS = ("path", "image", "file", "filename", "key", "source-ref")
LABEL_KEYS = ("label", "labels", "class", "class_name")
SEVERAL_LABELS = re.compile(r"\s*[|;]\s*")  # between the labels of one CSV cell or string, task=multilabel
SPLIT_NAMES = {"train": "training", "training": "training", "validation": "validation", "valid": "validation",
               "val": "validation", "test": "test"}
DOWNLOAD_THREADS = 16


@dataclass(frozen=True)
class Entry:
    """One labelled image as a manifest names it."""

    image: str  # a path relative to the channel, or an s3:// URI
    labels: tuple[str, ...]  # one, or (task=multilabel) any number, none included
    split: str | None  # training, validation or test; None: the channel's own split
    line: int  # where the manifest names it: its line, or its item in a ManifestFile


class LabelledImages(Dataset):
    """Images and their class indices, with torchvision's ImageFolder's ``samples``, ``targets``,
    ``classes`` and ``loader``, from any source."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Callable | None,
                 loader: Callable[[str], Any] = default_loader) -> None:
        self.loader = loader
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
        image = self.loader(path)
        return (self.transform(image) if self.transform is not None else image), target


FORMAT_SUFFIXES = {"csv": (".csv",), "jsonl": (".jsonl", ".manifest"), "augmented-manifest": (".jsonl", ".manifest"),
                   "manifest-file": (".json", ".manifest")}
# What a file with each suffix may hold, looked for in this order.
FORMATS_BY_SUFFIX = {".csv": ("csv",), ".jsonl": ("jsonl",), ".manifest": ("manifest-file", "jsonl"),
                  ".json": ("manifest-file",)}
MANIFEST_FILE_START = re.compile(r'\A\s*\[\s*\{\s*"prefix"\s*:')


def looks_like_manifest(path: Path, data_format: str) -> bool:
    """Whether the file's header (CSV), first record (JSON Lines) or opening (ManifestFile) names
    images and labels: a CSV or JSON file of something else beside the images (a submission
    template, a list of classes) is not one."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            if data_format == "manifest-file":
                return MANIFEST_FILE_START.match(file.read(4096)) is not None
            if data_format == "csv":
                header = {name.strip().lower() for name in next(csv.reader(file), [])}
                return bool(header & set(IMAGE_KEYS)) and bool(header & set(LABEL_KEYS))
            first = next((line for line in file if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
        return False
    return isinstance(record, dict) and ("source-ref" in record or (
        _first_key(record, IMAGE_KEYS) is not None and _first_key(record, LABEL_KEYS) is not None))


def find_manifest(folder: Path, data_format: str) -> tuple[Path, str] | None:
    """The channel's manifest and its format, or None for an ImageFolder. ``auto`` takes a file
    that looks like a manifest; a named format takes the one file with its suffix."""
    if data_format == "folder":
        return None
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in FORMATS_BY_SUFFIX)
    found: list[tuple[Path, str]] = []
    if data_format == "auto":
        for path in files:
            held = next((fmt for fmt in FORMATS_BY_SUFFIX[path.suffix.lower()] if looks_like_manifest(path, fmt)), None)
            if held is None:
                logger.info("%s: not a manifest (no images and labels); left alone", path)
            else:
                found.append((path, held))
    else:
        named = [path for path in files if path.suffix.lower() in FORMAT_SUFFIXES[data_format]]
        # Of the files with the format's suffix, those that look like one (a classes.json beside a
        # ManifestFile is not a second manifest); all of them when none does, to name the fault.
        sniffed = "jsonl" if data_format == "augmented-manifest" else data_format
        found = [(path, data_format) for path in [p for p in named if looks_like_manifest(p, sniffed)] or named]
    if len(found) > 1:
        raise DataError(f"{folder} holds several manifests ({', '.join(path.name for path, _ in found)}): "
                        "keep one per channel")
    if not found:
        if data_format != "auto":
            raise DataError(f"data_format={data_format} but {folder} holds no "
                            f"{' or '.join(FORMAT_SUFFIXES[data_format])} file at its top level")
        return None
    return found[0]


def _first_key(record: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in record), None)


def _label_attribute(record: Mapping[str, Any], chosen: str, *, multi_label: bool) -> str | None:
    """A Ground Truth record's label attribute: the chosen one, else the one whose -metadata holds
    a class-name (or, multi-label, a class-map), else a plain label key (``class``, as SageMaker's
    built-in algorithms read it)."""
    if chosen:
        return chosen
    def holding(name: str) -> list[str]:
        return sorted(key.removesuffix("-metadata") for key, value in record.items()
                      if key.endswith("-metadata") and isinstance(value, dict) and name in value)

    # Single-label, a class-map attribute is taken only when there is nothing else, to be refused
    # by name (see _ground_truth_labels).
    names = ("class-name", "class-map") if multi_label else ("class-name",)
    candidates = [attribute for name in names for attribute in holding(name)] or holding("class-map")
    if len(candidates) > 1:
        raise DataError(f"found {len(candidates)} label attributes with a {' or '.join(names)} "
                        f"({', '.join(candidates)}); name one with the label_attribute hyperparameter")
    return candidates[0] if candidates else _first_key(record, LABEL_KEYS)


def _split(value: Any, where: str) -> str | None:
    if value in (None, ""):
        return None
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise DataError(f"{where}: split {value!r} is none of {', '.join(sorted(SPLIT_NAMES))}")
    return split


def _label(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: a label is a name or a number, not {json.dumps(value)[:80]}")
    return str(value).strip()


def _labels(value: Any, where: str, *, multi_label: bool) -> tuple[str, ...] | None:
    """One label; or, for task=multilabel, a list of them or a string of them separated by ``|`` or
    ``;`` (an empty one: an image with none of the labels). None: no label given."""
    if not multi_label:
        label = _label(value, where)
        return None if label is None else (label,)
    if value is None:
        return None
    if isinstance(value, str):
        value = [part for part in SEVERAL_LABELS.split(value.strip()) if part]
    if not isinstance(value, list):
        value = [value]
    labels = [_label(item, where) for item in value]
    if None in labels:
        raise DataError(f"{where}: an empty label in {json.dumps(value)[:80]}")
    return tuple(sorted(set(labels)))  # type: ignore[arg-type]


def _ground_truth_labels(record: Mapping[str, Any], attribute: str | None, where: str, *,
                         multi_label: bool) -> tuple[str, ...] | None:
    """The class names of a Ground Truth record: ``class-name`` (image classification), or the
    ``class-map`` entries of the attribute's class ids (multi-label image classification). None
    for a record its workers could not label."""
    metadata = record.get(f"{attribute}-metadata")
    if not isinstance(metadata, dict):
        return _labels(record.get(attribute) if attribute else None, where, multi_label=multi_label)
    if "class-map" in metadata:
        if not multi_label:
            raise DataError(f"{where}: a multi-label record (its metadata has a class-map): train it with "
                            "task=multilabel")
        ids, names = record.get(attribute), metadata["class-map"]
        if not isinstance(ids, list) or not isinstance(names, dict) or any(str(i) not in names for i in ids):
            raise DataError(f"{where}: {attribute} must list class ids that its metadata's class-map names")
        return _labels([names[str(i)] for i in ids], where, multi_label=True)
    return _labels(metadata["class-name"], where, multi_label=multi_label) if "class-name" in metadata else None


def _records(manifest: Path, data_format: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with manifest.open(newline="", encoding="utf-8-sig") as file:
        if data_format == "csv":
            reader = csv.DictReader(file)
            header = {name.strip().lower() for name in reader.fieldnames or ()}
            if not (header & set(IMAGE_KEYS) and header & set(LABEL_KEYS)):
                raise DataError(f"{manifest.name}: its header ({', '.join(sorted(header)) or 'none'}) needs an image "
                                f"column ({', '.join(IMAGE_KEYS)}) and a label column ({', '.join(LABEL_KEYS)})")
            for row in reader:
                yield reader.line_num, {key.strip().lower(): value for key, value in row.items() if key is not None}
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


def _manifest_file(manifest: Path) -> list[Entry]:
    """A ManifestFile's images, labelled by their folder: ``[{"prefix": ...}, "<class>/<image>", ...]``."""
    shape = 'a JSON list that starts with {"prefix": "s3://bucket/prefix/"} and goes on with object keys'
    try:
        document = json.loads(manifest.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{manifest.name}: not JSON ({exc}); a ManifestFile is {shape}") from None
    head = document[0] if isinstance(document, list) and document else None
    prefix = head.get("prefix") if isinstance(head, dict) else None
    if not isinstance(prefix, str) or not prefix.startswith("s3://"):
        raise DataError(f"{manifest.name}: a ManifestFile is {shape}")
    entries: list[Entry] = []
    for item, key in enumerate(document[1:], start=1):
        where = f"{manifest.name} item {item}"
        if not isinstance(key, str) or not key.strip("/"):
            raise DataError(f"{where}: expected an object key, not {json.dumps(key)[:80]}")
        parts = key.strip("/").split("/")
        if len(parts) < 2:
            raise DataError(f"{where}: {key!r} is in no class folder: keys are <class>/<image> or "
                            "<split>/<class>/<image> below the prefix")
        split = SPLIT_NAMES.get(parts[0].lower()) if len(parts) > 2 else None
        entries.append(Entry(prefix + key, (parts[-2],), split, item))
    if not entries:
        raise DataError(f"{manifest} lists no images")
    return entries


def read_manifest(manifest: Path, data_format: str, *, label_attribute: str = "",
                  multi_label: bool = False) -> list[Entry]:
    """The manifest's labelled images. A Ground Truth record without a class name (an object its
    workers could not label, whose metadata says why) is left out with a warning."""
    if data_format == "manifest-file":
        return _manifest_file(manifest)
    entries: list[Entry] = []
    unlabelled: list[int] = []
    attribute: str | None = label_attribute or None
    for line, record in _records(manifest, data_format):
        where = f"{manifest.name} line {line}"
        ground_truth = data_format == "augmented-manifest" or (data_format == "jsonl" and "source-ref" in record)
        image_key = "source-ref" if ground_truth else _first_key(record, IMAGE_KEYS)
        image = record.get(image_key) if image_key else None
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: no image ({'source-ref' if ground_truth else ' or '.join(IMAGE_KEYS)})")
        if ground_truth:
            try:
                attribute = attribute or _label_attribute(record, label_attribute, multi_label=multi_label)
            except DataError as error:
                raise DataError(f"{where}: {error}") from None
            labels = _ground_truth_labels(record, attribute, where, multi_label=multi_label)
            if labels is None:
                unlabelled.append(line)
                continue
        else:
            label_key = _first_key(record, LABEL_KEYS)
            labels = _labels(record.get(label_key) if label_key else None, where, multi_label=multi_label)
            if labels is None:
                raise DataError(f"{where}: no label ({' or '.join(LABEL_KEYS)})")
        entries.append(Entry(image.strip(), labels, _split(record.get("split"), where), line))
    if unlabelled:
        logger.warning("%s: left out %d record(s) with no class name (not labelled), e.g. line %d",
                       manifest.name, len(unlabelled), unlabelled[0])
    if not entries:
        raise DataError(f"{manifest} lists no labelled images")
    return entries


def _s3_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key or key.endswith("/") or ".." in key.split("/"):
        raise DataError(f"{uri!r} does not name an S3 object")
    return bucket, key


def _local_path(channel: Path, image: str) -> Path | None:
    """Where a manifest's image is on disk, or None when it must be downloaded. An S3 object is
    looked for under the channel at its key, or at the end of its key (the channel holds a copy
    of some prefix: ``s3://bucket/data/images/1.jpg`` at ``images/1.jpg`` or ``1.jpg``)."""
    if not image.startswith("s3://"):
        path = Path(image)
        return path if path.is_absolute() else channel / path
    _, key = _s3_key(image)
    parts = key.split("/")
    return next((channel.joinpath(*parts[start:]) for start in range(len(parts))
                 if channel.joinpath(*parts[start:]).is_file()), None)


def _download(uris: Sequence[str], folder: Path, s3: Any) -> dict[str, Path]:
    """Download each object once into ``folder``. An object that is not there stays missing (and
    is skipped like an unreadable file); any other failure (credentials, permissions, network)
    stops training with the reason. One process on a host downloads; the others, waiting on the
    folder's lock, then find the files there."""
    from botocore.exceptions import ClientError

    def fetch(uri: str) -> tuple[str, Path]:
        bucket, key = _s3_key(uri)
        target = folder / bucket / key
        if target.is_file():  # downloaded already (each file appears whole: a temporary name, then renamed)
            return uri, target
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            s3.download_file(bucket, key, str(target))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                raise DataError(f"cannot download {uri}: {error} (does the job's role may s3:GetObject "
                                "there, and can the job reach S3?)") from None
            logger.warning("%s: no such object", uri)
        except Exception as error:  # noqa: BLE001 - no credentials, no network: the same for every image
            raise DataError(f"cannot download {uri}: {type(error).__name__}: {error}") from None
        return uri, target

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            return dict(pool.map(fetch, sorted(set(uris))))


def resolve(channel: Path, entries: Sequence[Entry], *,
            download_dir: Path | None = None) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(path on disk, labels, split) for each entry, downloading the S3 images not in the channel."""
    local = [_local_path(channel, entry.image) for entry in entries]
    remote = [entry.image for entry, path in zip(entries, local) if path is None]
    downloaded: dict[str, Path] = {}
    if remote:
        import boto3

        folder = download_dir or Path(tempfile.mkdtemp(prefix="images-", dir=os.environ.get("TMPDIR")))
        logger.info("downloading %d image(s) named by the manifest from S3 into %s", len(set(remote)), folder)
        downloaded = _download(remote, folder, boto3.client("s3"))
    return [(str(path if path is not None else downloaded[entry.image]), entry.labels, entry.split)
            for entry, path in zip(entries, local)]
