"""``classifier-deploy package``: an existing model made servable without training.

From a state dict (``.pth`` / ``.pt`` / ``.safetensors``) of a torchvision or timm architecture,
a TorchScript file or an ONNX file, plus its class names, write a model artifact
(``manifest.json`` and the network) and a ``model.tar.gz`` with the files at its root::

    python -m deploy package --architecture resnet50 --weights resnet50-dogs.pth \\
        --classes classes.txt --output model/
    python -m deploy package --torchscript traced.pt --classes classes.txt --image-size 256 --output model/
    python -m deploy package --onnx dogs.onnx --classes classes.txt --output model/

The artifact is checked before anything is written where it was asked for: the server's own
loader loads it and classifies a sample image (``--sample``, or a blank one). PyTorch is imported
only when packaging: the rest of the deploy CLI runs without it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
DEFAULT_IMAGE_SIZE = 224


class PackageError(ValueError):
    """The inputs cannot make a working artifact; the message says why."""


def read_classes(text: str) -> tuple[str, ...]:
    """Class names from a file (one per line, or a JSON list) or a comma-separated list."""
    path = Path(text)
    if path.is_file():
        content = path.read_text()
        try:
            names = json.loads(content)
        except json.JSONDecodeError:
            names = [line.strip() for line in content.splitlines() if line.strip()]
        if not isinstance(names, list):
            raise PackageError(f"{path}: expected one class name per line or a JSON list")
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if len(names) < 1 or len(set(map(str, names))) != len(names):
        raise PackageError(f"class names must be unique and at least one: got {names[:10]}")
    return tuple(str(name) for name in names)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, unwrapped from the usual checkpoint layouts and DDP's ``module.``."""
    import safetensors.torch
    import torch

    if not path.is_file():
        raise PackageError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        state: Any = safetensors.torch.load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a pickle of code, a TorchScript file, a damaged file
            raise PackageError(f"{path} is not a state dict of tensors ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); a TorchScript file goes "
                               "to --torchscript") from None
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[key] for key in STATE_DICT_KEYS if isinstance(state.get(key), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state:
        raise PackageError(f"{path} holds no state dict")
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def network_from_state_dict(architecture: str, path: Path, num_classes: int) -> torch.nn.Module:
    from classifier.models import UnknownArchitectureError, create_model

    try:
        model = create_model(architecture, num_classes)
    except UnknownArchitectureError as exc:
        raise PackageError(str(exc)) from None
    state = load_state_dict(path)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [f"{key} {tuple(state[key].shape)} (expected {tuple(own[key].shape)})"
             for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing, e.g. {missing[:3]}" if missing else "",
                    f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}" if unexpected else "",
                    f"of another shape: {'; '.join(wrong[:3])}" if wrong else ""]
        raise PackageError(f"the weights in {path} do not fit {architecture} with {num_classes} classes: "
                           + ", ".join(p for p in problems if p))
    model.load_state_dict(state)
    return model.eval()


def onnx_image_size(path: Path, asked: int | None) -> int:
    """The input size of the ONNX network in ``path``: the one it was exported with, else ``asked``
    (else 224); a size that contradicts the network's is refused."""
    from classifier.onnx_model import OnnxModel, OnnxModelError

    if not path.is_file():
        raise PackageError(f"{path}: no such file")
    try:
        fixed = OnnxModel(path, threads=1).image_size
    except OnnxModelError as exc:
        raise PackageError(f"{path}: {exc}") from None
    if fixed is not None and asked is not None and asked != fixed:
        raise PackageError(f"{path} takes {fixed}×{fixed} images; --image-size {asked} does not fit it")
    return fixed or asked or DEFAULT_IMAGE_SIZE


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    from classifier import artifact

    try:
        return artifact.load_torchscript(path)
    except Exception as exc:  # noqa: BLE001
        raise PackageError(f"{path} is not a TorchScript file: {type(exc).__name__}") from None


@dataclass(frozen=True)
class Checked:
    """What the server's loader made of the artifact."""

    sample_top: list[tuple[str, float]]
    runs_as: str  # how the server runs the network: "frozen", "ONNX Runtime", or "" (as it is)


def check(directory: Path, sample: Image.Image) -> Checked:
    """Load ``directory`` as the server does and classify ``sample``; any failure is a PackageError."""
    from serve.predictor import Predictor

    try:
        predictor = Predictor.load(directory, allow_default=False, device="cpu")
        predictor.warm_up()  # also checks one score per class name
        [predictions] = predictor.predict([sample], top_k=3)
    except Exception as exc:  # noqa: BLE001
        raise PackageError(f"the packaged model does not run: {type(exc).__name__}: {exc}") from None
    runs_as = "ONNX Runtime" if predictor.onnx else "frozen" if predictor.jit else ""
    return Checked([(p.label, p.probability) for p in predictions], runs_as)


def write_tarball(directory: Path, tarball: Path) -> None:
    """``model.tar.gz`` with the artifact's files at its root, as SageMaker unpacks it."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:gz") as archive:
        for path in sorted(directory.iterdir()):
            archive.add(path, arcname=path.name)


def package(args: argparse.Namespace) -> tuple[Path, Path, Checked]:
    from classifier import artifact
    from classifier.artifact import Manifest, Preprocessing
    from classifier.export import write_graph

    classes = read_classes(args.classes)
    size = onnx_image_size(Path(args.onnx), args.image_size) if args.onnx else args.image_size or DEFAULT_IMAGE_SIZE
    preprocessing = Preprocessing(
        crop_size=size, resize_size=args.resize_size or round(size / 0.875),
        mean=tuple(args.mean), std=tuple(args.std), interpolation=args.interpolation)  # type: ignore[arg-type]
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise PackageError(f"{output} is not empty; choose a new folder")
    sample = Image.open(args.sample).convert("RGB") if args.sample else Image.new("RGB", (256, 256), (128, 128, 128))
    source = {"packaged_from": str(args.weights or args.torchscript or args.onnx)}
    with tempfile.TemporaryDirectory(prefix=".package-", dir=output.parent if output.parent.exists() else None) as tmp:
        staging = Path(tmp) / "model"
        if args.onnx:
            architecture, save, network = artifact.ONNX, artifact.save_onnx, Path(args.onnx)
        elif args.torchscript:
            architecture, save = artifact.TORCHSCRIPT, artifact.save_torchscript
            network = load_torchscript(Path(args.torchscript))
        else:
            architecture, save = args.architecture, artifact.save
            network = network_from_state_dict(args.architecture, Path(args.weights), len(classes))
        save(staging, network, Manifest(architecture=architecture, class_names=classes, preprocessing=preprocessing,
                                        training=source))
        if save is artifact.save:  # a state dict: its ONNX graph too, so no server exports it at start
            write_graph(staging)
        checked = check(staging, sample)
        output.mkdir(parents=True, exist_ok=True)
        for path in staging.iterdir():
            shutil.move(str(path), output / path.name)
    tarball = Path(args.tarball) if args.tarball else output.with_name(output.name + ".tar.gz")
    write_tarball(output, tarball)
    return output, tarball, checked


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("package", help="make an existing model servable (state dict, TorchScript or ONNX)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="state dict file (.pth, .pt, .safetensors) of --architecture")
    source.add_argument("--torchscript", help="TorchScript file (torch.jit.save)")
    source.add_argument("--onnx", help="ONNX file (torch.onnx.export): one input N×3×H×W, one score per class out; "
                                       "run by ONNX Runtime on the CPU")
    parser.add_argument("--architecture", help="with --weights: a torchvision model name (resnet50, "
                                               "efficientnet_b0, ...), efficientnet_lite0 or timm/<name>")
    parser.add_argument("--classes", required=True, help="class names: a file (one per line or a JSON list) "
                                                         "or a comma-separated list, in output order")
    parser.add_argument("--output", required=True, help="new folder for the artifact")
    parser.add_argument("--tarball", help="where model.tar.gz goes (default: next to --output, <output>.tar.gz)")
    parser.add_argument("--image-size", type=int, help="the network's input size (default: an ONNX network's "
                                                       f"own, else {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--resize-size", type=int, help="short side before the centre crop (default: size / 0.875)")
    parser.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, metavar=("R", "G", "B"),
                        help="normalisation mean (default: ImageNet's)")
    parser.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, metavar=("R", "G", "B"),
                        help="normalisation std (default: ImageNet's)")
    parser.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic", "nearest"))
    parser.add_argument("--sample", help="an image to classify as the check (default: a blank one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading does")
    return parser


def cmd_package(args: argparse.Namespace, session: Any = None, environ: Any = None) -> int:
    """The ``package`` subcommand (needs no AWS)."""
    if args.weights and not args.architecture:
        raise PackageError("--weights needs --architecture (the network the state dict belongs to)")
    output, tarball, checked = package(args)
    top = ", ".join(f"{label} {probability:.3f}" for label, probability in checked.sample_top)
    print(f"artifact: {output}")
    print(f"model.tar.gz: {tarball}")
    print(f"checked: loaded as the server loads it{f' ({checked.runs_as})' if checked.runs_as else ''}; "
          f"sample -> {top}")
    return 0

