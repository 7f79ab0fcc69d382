"""The model artifact: weights plus a manifest that says everything needed to use them.

Layout of an artifact directory (the root of ``model.tar.gz``)::

    manifest.json       architecture, class names, preprocessing, training settings, versions
    model.safetensors   the network's state dict (an architecture :mod:`classifier.models` builds)
    model.pt            or, for architecture "torchscript", the whole network as TorchScript
    model.onnx          or, for architecture "onnx", the whole network as ONNX (run by ONNX Runtime)

The manifest is written last, so a directory with a manifest is a complete artifact.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torchvision
from torch import nn

import classifier
from classifier.models import create_model
from classifier.onnx_model import OnnxModel, OnnxModelError
from classifier.presets import EvalPreset

FORMAT_VERSION = 1
# A multi-label artifact is version 2: a reader that knows only version 1 refuses it, rather than
# serving it as single-label. This build reads both.
MULTILABEL_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, MULTILABEL_FORMAT_VERSION)
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT = "torchscript"  # the architecture of an artifact that carries its network as TorchScript
TORCHSCRIPT_FILE = "model.pt"
ONNX = "onnx"  # the architecture of an artifact that carries its network as ONNX
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # the weights of an ONNX network too large for one file
ONNX_ONE_FILE_BYTES = 1_800_000_000  # protobuf's limit is 2 GB
NETWORK_FILES = {TORCHSCRIPT: TORCHSCRIPT_FILE, ONNX: ONNX_FILE}  # by architecture; any other: WEIGHTS_FILE
# Bounds on what a manifest may ask of its reader: the server allocates inputs of the crop size
# (warm-up included) before a single request arrives, and reads the manifest whole.
MAX_IMAGE_SIDE = 4096
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MULTICLASS, MULTILABEL = "multiclass", "multilabel"  # one class an image (softmax), or any number (sigmoid)


class ArtifactError(ValueError):
    """An artifact directory is missing, incomplete or malformed."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def eval_preset(self) -> EvalPreset:
        return EvalPreset(
            crop_size=self.crop_size,
            resize_size=self.resize_size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
        )


@dataclass(frozen=True)
class Manifest:
    architecture: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    task: str = MULTICLASS
    # multilabel: a class is answered when its probability reaches its threshold (one per class)
    thresholds: tuple[float, ...] = ()
    versions: Mapping[str, str] = field(default_factory=lambda: runtime_versions())
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["thresholds"] = list(self.thresholds)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ArtifactError(f"unsupported artifact format_version {version!r} (this build reads "
                                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        try:
            prep = data["preprocessing"]
            preprocessing = Preprocessing(
                crop_size=int(prep["crop_size"]),
                resize_size=int(prep["resize_size"]),
                mean=_triple(prep["mean"], "mean"),
                std=_triple(prep["std"], "std"),
                interpolation=str(prep.get("interpolation", "bilinear")),
            )
            class_names = tuple(str(name) for name in data["class_names"])
            manifest = cls(
                architecture=str(data["architecture"]),
                class_names=class_names,
                preprocessing=preprocessing,
                training=dict(data.get("training", {})),
                metrics=dict(data.get("metrics", {})),
                task=str(data.get("task", MULTICLASS)),
                thresholds=tuple(float(value) for value in data.get("thresholds", ())),
                versions=dict(data.get("versions", {})),
                format_version=version,
            )
        except KeyError as exc:
            raise ArtifactError(f"manifest is missing the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest has a malformed field: {exc}") from None
        if not class_names:
            raise ArtifactError("manifest lists no class names")
        if manifest.task not in (MULTICLASS, MULTILABEL):
            raise ArtifactError(f"manifest has task {manifest.task!r}; it must be {MULTICLASS} or {MULTILABEL}")
        if manifest.task == MULTILABEL and version != MULTILABEL_FORMAT_VERSION:
            raise ArtifactError(f"a {MULTILABEL} manifest has format_version {MULTILABEL_FORMAT_VERSION}, not {version}")
        if manifest.task == MULTILABEL and (len(manifest.thresholds) != len(class_names)
                                            or not all(0 <= t <= 1 for t in manifest.thresholds)):
            raise ArtifactError(f"a {MULTILABEL} manifest needs one threshold from 0 to 1 per class "
                                f"({len(class_names)}); it has {list(manifest.thresholds)[:8]}")
        for name in ("crop_size", "resize_size"):
            side = getattr(preprocessing, name)
            if not 1 <= side <= MAX_IMAGE_SIDE:
                raise ArtifactError(f"manifest has preprocessing.{name} {side}; it must be 1 to {MAX_IMAGE_SIDE} pixels")
        return manifest


def _triple(value: Sequence[float], name: str) -> tuple[float, float, float]:
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {list(value)}")
    return (float(value[0]), float(value[1]), float(value[2]))


def runtime_versions() -> dict[str, str]:
    return {
        "classifier": classifier.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def is_artifact(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file()


def visible_entries(directory: str | os.PathLike[str]) -> list[Path]:
    """What ``directory`` holds, leaving out hidden files (``.DS_Store``, ``._x`` from macOS tars)."""
    try:
        return sorted(entry for entry in Path(directory).iterdir() if not entry.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def not_an_artifact(directory: str | os.PathLike[str], *, shown: int = 8) -> str:
    """Why the files in ``directory`` are not an artifact, naming what is there (by relative name)."""
    entries = visible_entries(directory)
    names = [entry.name + ("/" if entry.is_dir() else "") for entry in entries]
    found = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    reason = f"the model folder holds no model artifact ({MANIFEST_FILE} + {WEIGHTS_FILE}); it holds: {found}"
    nested = [entry for entry in entries if entry.is_dir() and is_artifact(entry)]
    if nested:
        return (f"{reason}. The artifact is one folder down, in {nested[0].name}/: pack model.tar.gz with its "
                f"files at the root (tar -czf model.tar.gz -C {nested[0].name} .)")
    if any(entry.suffix in (".pth", ".pt", ".onnx", ".bin", ".ckpt") for entry in entries):
        return (f"{reason}. A bare weights file says nothing of its architecture, classes or preprocessing: "
                f"classifier-deploy package makes an artifact of it")
    return reason


def save(directory: str | os.PathLike[str], model: nn.Module, manifest: Manifest) -> Path:
    """Write ``model``'s weights and ``manifest`` into ``directory`` (created if needed)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return _save(directory, WEIGHTS_FILE,
                 lambda path: safetensors.torch.save_file(state, str(path), metadata={"format": "pt"}), manifest)


def save_torchscript(directory: str | os.PathLike[str], network: torch.jit.ScriptModule, manifest: Manifest) -> Path:
    """Write a TorchScript network and its manifest (architecture "torchscript") into ``directory``."""
    if manifest.architecture != TORCHSCRIPT:
        raise ArtifactError(f"a TorchScript artifact's architecture is {TORCHSCRIPT!r}, not {manifest.architecture!r}")
    return _save(directory, TORCHSCRIPT_FILE, lambda path: network.save(str(path)), manifest)


def save_onnx(directory: str | os.PathLike[str], source: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write an ONNX network and its manifest (architecture "onnx") into ``directory``: one file,
    ``model.onnx``, whatever external-data files the source's weights were in (``torch.onnx.export``
    writes ``<name>.onnx.data`` beside it), unless the weights are too large for one file (2 GB):
    then ``model.onnx.data`` beside it."""
    import onnx  # the packaging side only: the server runs the file with ONNX Runtime alone

    if manifest.architecture != ONNX:
        raise ArtifactError(f"an ONNX artifact's architecture is {ONNX!r}, not {manifest.architecture!r}")
    network = onnx.load(str(source))  # with its external data, wherever the source says it is

    def write(path: Path) -> None:
        # The weights' size, counted without serialising the model (which fails above 2 GB).
        weights = sum(len(tensor.raw_data) or tensor.ByteSize() for tensor in network.graph.initializer)
        large = weights > ONNX_ONE_FILE_BYTES
        data = path.with_name(ONNX_DATA_FILE)
        data.unlink(missing_ok=True)
        onnx.save_model(network, str(path), save_as_external_data=large, location=ONNX_DATA_FILE)
        if large:
            data.chmod(0o644)

    return _save(directory, ONNX_FILE, write, manifest)


def _save(directory: str | os.PathLike[str], network_file: str, write_network: Any, manifest: Manifest) -> Path:
    """The network's file, then the manifest last: a directory with a manifest is complete."""
    Manifest.from_dict(manifest.to_dict())  # what a reader would refuse is never written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / network_file, write_network)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    write_atomically(directory / MANIFEST_FILE, lambda path: path.write_text(text))
    return directory


def weights_file(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """The file holding the network of the artifact in ``directory``."""
    return Path(directory) / NETWORK_FILES.get(manifest.architecture, WEIGHTS_FILE)


def network_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every file of the network in ``directory`` (of either kind, an ONNX network's external
    weights included), found without reading the manifest."""
    names = (WEIGHTS_FILE, *NETWORK_FILES.values(), ONNX_DATA_FILE)
    return [path for path in (Path(directory) / name for name in names) if path.is_file()]


def any_weights_file(directory: str | os.PathLike[str]) -> Path | None:
    """The network file of either kind in ``directory``, found without reading the manifest."""
    return next((path for path in (Path(directory) / name for name in (WEIGHTS_FILE, *NETWORK_FILES.values()))
                 if path.is_file()), None)


def load_torchscript(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript file, in eval mode (TorchScript's deprecation warning silenced: it still loads)."""
    with warnings.catch_warnings():
        # Deprecated, not gone: a FutureWarning in this torch, a DeprecationWarning in some older ones.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def write_atomically(target: Path, write: Any) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    write(temporary)
    # Readable by all (safetensors writes 0600): a model trained as root is served by the image's
    # unprivileged user (docker compose), and the artifact holds nothing secret.
    temporary.chmod(0o644)
    os.replace(temporary, target)


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{MANIFEST_FILE} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes")
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"no {MANIFEST_FILE} in {directory}: not a model artifact") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    return Manifest.from_dict(data)


def load(directory: str | os.PathLike[str], device: str | torch.device = "cpu", *,
         threads: int | None = None) -> tuple[nn.Module | OnnxModel, Manifest]:
    """Rebuild the network described by the artifact in ``directory``, in eval mode. An ONNX
    network runs on the CPU whatever ``device`` says, with ``threads`` threads (None: one per core)."""
    manifest = load_manifest(directory)
    weights = weights_file(directory, manifest)
    if not weights.is_file():
        raise ArtifactError(f"no {weights.name} in {directory}")
    if manifest.architecture == TORCHSCRIPT:
        return load_torchscript(weights, device), manifest
    if manifest.architecture == ONNX:
        try:
            size = sum(path.stat().st_size for path in network_files(directory))
            network = OnnxModel(weights, threads, size_bytes=size)
        except OnnxModelError as exc:
            raise ArtifactError(str(exc)) from None
        crop = manifest.preprocessing.crop_size
        if network.fixed_shape != (None, None) and network.fixed_shape != (crop, crop):
            raise ArtifactError(f"the ONNX network takes {network.fixed_shape[0]}×{network.fixed_shape[1]} images "
                                f"but the manifest crops them to {crop}×{crop}")
        return network, manifest
    model = create_model(manifest.architecture, manifest.num_classes)
    state = safetensors.torch.load_file(str(weights), device=str(device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"weights in {weights} do not fit {manifest.architecture} "
            f"with {manifest.num_classes} classes: {exc}"
        ) from None
    return model.to(device).eval(), manifest
