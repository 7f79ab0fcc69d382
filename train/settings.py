"""Training settings, resolved once from every place SageMaker, EC2 or a laptop puts them.

Lookup order, first match wins, for each setting:

1. command-line flags                    ``python -m train --epochs 3`` / ``docker run IMAGE train --epochs 3``
2. ``<base>/input/config/hyperparameters.json``   SageMaker's; every value arrives as a string
3. environment                           ``SM_HP_<NAME>``, ``SM_HPS``, ``SM_CHANNEL_<NAME>``,
                                         ``SM_MODEL_DIR``, ``SM_OUTPUT_DATA_DIR``, ... when set
4. derived from ``<base>/input/config/*.json`` and the folders under ``<base>/input/data``
5. defaults

``<base>`` is ``/opt/ml`` unless ``--base-dir`` or ``SAGEMAKER_BASE_DIR`` says otherwise, so the
same code runs inside SageMaker, in ``docker run`` on any host, and straight from a checkout.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from classifier.models import TIMM_PREFIX, available_architectures
from classifier.parsing import parse_bool
from train.errors import SettingsError

DEFAULT_BASE_DIR = Path("/opt/ml")
IMDS_ENDPOINT = "http://169.254.169.254"  # EC2's instance metadata service
SPOT_POLL_S = 5.0
TRAIN_CHANNELS = ("training", "train")
VALIDATION_CHANNELS = ("validation", "valid", "val")
TEST_CHANNELS = ("test",)
# Keys the SageMaker SDK and tuning service add to hyperparameters.json for their own use.
RESERVED_PREFIXES = ("sagemaker_", "_")
ALIASES = {"lr": "learning_rate", "arch": "architecture", "model_name": "architecture"}


OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
AUGMENTATIONS = ("none", "basic", "trivialaugment", "randaugment", "autoaugment")
TASKS = ("multiclass", "multilabel")
DATA_FORMATS = ("auto", "folder", "csv", "jsonl", "augmented-manifest", "manifest-file")  # see train.sources


@dataclass(frozen=True)
class Hyperparameters:
    architecture: str = "efficientnet_lite0"
    pretrained: bool = True
    weights_file: str = ""  # state dict to start from (else the `pretrained` channel's file)
    freeze_backbone: bool = False
    epochs: int = 10
    batch_size: int = 64  # per process
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_step_size: int = 30  # epochs between decays, lr_schedule=step
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    image_size: int = 224
    augmentation: str = "basic"
    amp: bool = False  # mixed precision on CUDA
    channels_last: bool = False
    workers: int = -1  # -1: one loader process per core, at most 8
    seed: int = 0
    early_stopping_patience: int = 0  # epochs without validation improvement; 0 = off
    checkpoint_steps: int = 0  # also checkpoint every N steps; 0 = at epoch ends only
    processes_per_host: int = 0  # 0: one per visible GPU, else one
    peer_timeout_s: float = 300.0
    tensorboard: bool = False  # scalars per epoch under <output>/tensorboard
    profile_steps: int = 0  # torch.profiler trace of this many steps (after 2 warm-up steps)
    export_graph: bool = True  # write graph.onnx (the network as ONNX, checked) into the artifact
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data_format: str = "auto"  # how channels are read: auto (a manifest if there is one) or one of DATA_FORMATS
    label_attribute: str = ""  # a Ground Truth manifest's label attribute; "": the one with a class-name
    task: str = "multiclass"  # multiclass: one label an image; multilabel: any number (from a manifest)

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, "must be at least 1"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("learning_rate", self.learning_rate > 0, "must be positive"),
            ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "must be in [0, epochs)"),
            ("lr_step_size", self.lr_step_size >= 1, "must be at least 1"),
            ("lr_gamma", 0 < self.lr_gamma <= 1, "must be in (0, 1]"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must not be negative"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("image_size", self.image_size >= 16, "must be at least 16"),
            ("workers", self.workers >= -1, "must be -1 (auto) or a count"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "must not be negative"),
            ("checkpoint_steps", self.checkpoint_steps >= 0, "must not be negative"),
            ("processes_per_host", self.processes_per_host >= 0, "must not be negative"),
            ("peer_timeout_s", self.peer_timeout_s > 0, "must be positive"),
            ("profile_steps", self.profile_steps >= 0, "must not be negative"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"must be one of {', '.join(LR_SCHEDULES)}"),
            ("augmentation", self.augmentation in AUGMENTATIONS, f"must be one of {', '.join(AUGMENTATIONS)}"),
            ("data_format", self.data_format in DATA_FORMATS, f"must be one of {', '.join(DATA_FORMATS)}"),
            ("task", self.task in TASKS, f"must be one of {', '.join(TASKS)}"),
            ("label_smoothing", self.task == "multiclass" or self.label_smoothing == 0,
             "is for task=multiclass (softmax); multi-label training takes none"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise SettingsError(f"hyperparameter {name}={getattr(self, name)!r} {rule}")
        if self.architecture not in available_architectures() and not self.architecture.startswith(TIMM_PREFIX):
            close = difflib.get_close_matches(self.architecture, available_architectures(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SettingsError(
                f"hyperparameter architecture={self.architecture!r} is not a known architecture{hint}"
            )


HYPERPARAMETER_NAMES = tuple(f.name for f in dataclasses.fields(Hyperparameters))


@dataclass(frozen=True)
class Paths:
    base_dir: Path
    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    train_dir: Path
    validation_dir: Path | None
    test_dir: Path | None
    pretrained_dir: Path | None = None
    checkpoint_s3_uri: str | None = None  # mirrored there by the run itself (outside SageMaker)

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def tensorboard_dir(self) -> Path:
        return self.output_dir / "tensorboard"


@dataclass(frozen=True)
class Settings:
    hyperparameters: Hyperparameters
    paths: Paths
    spot: bool = False  # watch EC2's instance metadata for the spot interruption notice
    spot_poll_s: float = SPOT_POLL_S  # how often (CLASSIFIER_SPOT_POLL_S)
    metadata_endpoint: str = IMDS_ENDPOINT  # botocore's AWS_EC2_METADATA_SERVICE_ENDPOINT overrides it

    def to_dict(self) -> dict[str, Any]:
        return {
            "hyperparameters": dataclasses.asdict(self.hyperparameters),
            "paths": {k: (str(v) if v is not None else None) for k, v in vars(self.paths).items()},
            "spot": self.spot,
        }


# --- value parsing -----------------------------------------------------------------------------


def _parse_int(text: str) -> int:
    number = float(text)
    if not number.is_integer():
        raise ValueError("expected a whole number")
    return int(number)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "bool": parse_bool,
    "int": _parse_int,
    "float": float,
}


def parse_value(name: str, value: Any, source: str) -> Any:
    """Turn ``value`` (a string from JSON, env or CLI, or an already typed JSON value) into the
    type of hyperparameter ``name``; errors name the key, the value and where it came from."""
    field_type = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}[name]
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        raise SettingsError(f"{source}: hyperparameter {name}={value!r} must be a single value")
    # SageMaker's SDK JSON-encodes values, so '"resnet18"' arrives with its quotes.
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    try:
        return _PARSERS[str(field_type)](text)
    except ValueError as exc:
        raise SettingsError(
            f"{source}: hyperparameter {name}={value!r} is not a valid {field_type}: {exc}"
        ) from None


def canonical_name(key: str, source: str) -> str | None:
    """The hyperparameter a key refers to; None for keys reserved by SageMaker."""
    if key.startswith(RESERVED_PREFIXES):
        return None
    name = key.strip().replace("-", "_").lower()
    name = ALIASES.get(name, name)
    if name not in HYPERPARAMETER_NAMES:
        close = difflib.get_close_matches(name, HYPERPARAMETER_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(
            f"{source}: unknown hyperparameter {key!r}{hint}; known hyperparameters: "
            + ", ".join(HYPERPARAMETER_NAMES)
        )
    return name


def _typed(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    typed = {}
    for key, value in values.items():
        name = canonical_name(key, source)
        if name is not None:
            typed[name] = parse_value(name, value, source)
    return typed


# --- sources -----------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SettingsError(f"command line: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="train",
        description="Fine-tune an image classifier on labelled images (an ImageFolder or a manifest).",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a misspelt flag must fail, not silently match another
    )
    paths = parser.add_argument_group("paths (default: SageMaker's layout under --base-dir)")
    paths.add_argument("--base-dir", help="root of the SageMaker layout (default /opt/ml)")
    paths.add_argument("--train", "--data-dir", dest="train",
                       help="training images: an ImageFolder, a folder holding train/ valid/ test/, or a folder "
                            "with a manifest (.csv, .jsonl, Ground Truth's .manifest)")
    paths.add_argument("--validation", help="validation images (an ImageFolder or a folder with a manifest)")
    paths.add_argument("--test", help="test images (an ImageFolder or a folder with a manifest)")
    paths.add_argument("--model-dir", help="where the model artifact is written")
    paths.add_argument("--output-data-dir", help="where reports and metrics are written")
    paths.add_argument("--checkpoint-dir", help="where checkpoints are written")
    ec2 = parser.add_argument_group("outside SageMaker (EC2, a laptop)")
    ec2.add_argument("--checkpoint-s3-uri", help="mirror the checkpoints at this s3:// prefix and resume from it "
                                                 "on a new machine (SageMaker syncs them itself)")
    ec2.add_argument("--spot", action="store_true",
                     help="on an EC2 spot instance: the two-minute interruption notice stops the run as "
                          "SIGTERM does (a checkpoint, then exit)")
    hps = parser.add_argument_group("hyperparameters")
    for field in dataclasses.fields(Hyperparameters):
        flags = {f"--{field.name.replace('_', '-')}", f"--{field.name}"}
        hps.add_argument(*sorted(flags), dest=field.name, metavar=str(field.type).upper(),
                         help=f"default: {field.default}")
    return parser


def read_json(path: Path) -> Any:
    """A JSON file's content; None when the file does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{path} is not valid JSON: {exc}") from None


def _environment_hyperparameters(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if "SM_HPS" in environ:
        try:
            hps = json.loads(environ["SM_HPS"])
        except json.JSONDecodeError as exc:
            raise SettingsError(f"environment: SM_HPS is not valid JSON: {exc}") from None
        if not isinstance(hps, dict):
            raise SettingsError("environment: SM_HPS must be a JSON object")
        values.update(_typed(hps, "environment SM_HPS"))
    for key, value in environ.items():
        if key.startswith("SM_HP_"):
            name = canonical_name(key.removeprefix("SM_HP_"), f"environment {key}")
            if name is not None:
                values[name] = parse_value(name, value, f"environment {key}")
    return values


def _channels(base_dir: Path, environ: Mapping[str, str], cli: Mapping[str, Any]) -> dict[str, Path]:
    """Channel name -> folder, from data folders, inputdataconfig.json, SM_CHANNEL_*, CLI."""
    channels: dict[str, Path] = {}
    data_dir = base_dir / "input" / "data"
    if data_dir.is_dir():
        channels.update({p.name: p for p in sorted(data_dir.iterdir()) if p.is_dir()})
    config = read_json(base_dir / "input" / "config" / "inputdataconfig.json") or {}
    for name, channel in config.items():
        if isinstance(channel, dict) and channel.get("TrainingInputMode") == "Pipe":
            raise SettingsError(
                f"channel {name!r} uses Pipe input mode, which this image does not read; "
                "use File or FastFile"
            )
        channels[name] = data_dir / name
    for key, value in environ.items():
        if key.startswith("SM_CHANNEL_") and value:
            channels[key.removeprefix("SM_CHANNEL_").lower()] = Path(value)
    for name in ("train", "validation", "test"):
        if name in cli:
            channels[{"train": "training"}.get(name, name)] = Path(cli[name])
    return channels


def _first(channels: Mapping[str, Path], names: Sequence[str]) -> Path | None:
    return next((channels[n] for n in names if n in channels), None)


def _first_subfolder(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_dir()), None)


def _holds_manifest(folder: Path, data_format: str) -> bool:
    from train.sources import find_manifest  # it reads these settings' names

    return find_manifest(folder, data_format) is not None


def _resolve_paths(cli: Mapping[str, Any], environ: Mapping[str, str], data_format: str = "auto") -> Paths:
    base_dir = Path(cli.get("base_dir") or environ.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR)

    def pick(flag: str, env: str, default: Path) -> Path:
        return Path(cli.get(flag) or environ.get(env) or default)

    output_dir = pick("output_dir", "SM_OUTPUT_DIR", base_dir / "output")
    channels = _channels(base_dir, environ, cli)
    train_dir = _first(channels, TRAIN_CHANNELS)
    if train_dir is None:
        raise SettingsError(
            "no training data: expected a 'training' channel "
            f"({base_dir}/input/data/training, SM_CHANNEL_TRAINING or --train); "
            f"channels found: {sorted(channels) or 'none'}"
        )
    if not train_dir.is_dir():
        raise SettingsError(f"training channel folder {train_dir} does not exist")
    validation_dir = _first(channels, VALIDATION_CHANNELS)
    test_dir = _first(channels, TEST_CHANNELS)
    # One channel holding train/ valid/ test/ (the layout most public datasets ship in), unless a
    # manifest beside them says which image is in which split.
    split_train = _first_subfolder(train_dir, ("train", "training"))
    if split_train is not None and not _holds_manifest(train_dir, data_format):
        validation_dir = validation_dir or _first_subfolder(train_dir, VALIDATION_CHANNELS)
        test_dir = test_dir or _first_subfolder(train_dir, TEST_CHANNELS)
        train_dir = split_train
    for name, folder in (("validation", validation_dir), ("test", test_dir)):
        if folder is not None and not folder.is_dir():
            raise SettingsError(f"{name} channel folder {folder} does not exist")
    return Paths(
        base_dir=base_dir,
        model_dir=pick("model_dir", "SM_MODEL_DIR", base_dir / "model"),
        output_dir=output_dir,
        output_data_dir=pick("output_data_dir", "SM_OUTPUT_DATA_DIR", output_dir / "data"),
        checkpoint_dir=pick("checkpoint_dir", "SM_CHECKPOINT_DIR", base_dir / "checkpoints"),
        train_dir=train_dir,
        validation_dir=validation_dir,
        test_dir=test_dir,
        pretrained_dir=channels.get("pretrained"),
        checkpoint_s3_uri=_checkpoint_s3_uri(cli, environ),
    )


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix/")."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"checkpoint S3 URI must look like s3://bucket/prefix/, not {uri!r}")
    prefix = parsed.path.lstrip("/")
    return parsed.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _checkpoint_s3_uri(cli: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    uri = cli.get("checkpoint_s3_uri") or environ.get("CLASSIFIER_CHECKPOINT_S3_URI") or None
    if uri is not None:
        try:
            split_s3_uri(uri)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    return uri


def resolve(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build the settings for one training run from the command line and environment."""
    cli = vars(build_parser().parse_args(list(argv)))
    paths = _resolve_paths(cli, environ)
    file_values = read_json(paths.base_dir / "input" / "config" / "hyperparameters.json") or {}
    if not isinstance(file_values, dict):
        raise SettingsError("hyperparameters.json must hold a JSON object")
    merged: dict[str, Any] = {}
    merged.update(_environment_hyperparameters(environ))
    merged.update(_typed(file_values, "hyperparameters.json"))
    merged.update(_typed({k: v for k, v in cli.items() if k in HYPERPARAMETER_NAMES}, "command line"))
    if merged.get("data_format", "auto") != "auto":  # how the training channel is read may change its splits
        paths = _resolve_paths(cli, environ, merged["data_format"])
    if merged.get("workers", -1) == -1:
        merged["workers"] = min(8, os.cpu_count() or 1)
    spot = cli.get("spot", False)
    if not spot and environ.get("CLASSIFIER_SPOT"):
        try:
            spot = parse_bool(environ["CLASSIFIER_SPOT"])
        except ValueError as exc:
            raise SettingsError(f"environment: CLASSIFIER_SPOT={environ['CLASSIFIER_SPOT']!r}: {exc}") from None
    try:
        poll_s = float(environ.get("CLASSIFIER_SPOT_POLL_S") or SPOT_POLL_S)
    except ValueError:
        poll_s = -1.0
    if not 0 < poll_s <= 60:
        raise SettingsError(f"environment: CLASSIFIER_SPOT_POLL_S={environ.get('CLASSIFIER_SPOT_POLL_S')!r} "
                            "must be a number of seconds above 0, at most 60")
    endpoint = (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_ENDPOINT).rstrip("/")
    return Settings(hyperparameters=Hyperparameters(**merged), paths=paths, spot=spot, spot_poll_s=poll_s,
                    metadata_endpoint=endpoint)


def base_dir_from(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Path, list[str]]:
    """The base folder (``--base-dir``, else ``SAGEMAKER_BASE_DIR``, else /opt/ml) and the other flags."""
    base = environ.get("SAGEMAKER_BASE_DIR") or str(DEFAULT_BASE_DIR)
    args, rest = list(argv), []
    index = 0
    while index < len(args):
        if args[index] == "--base-dir" and index + 1 < len(args):
            base, index = args[index + 1], index + 2
            continue
        if args[index].startswith("--base-dir="):
            base = args[index].split("=", 1)[1]
        else:
            rest.append(args[index])
        index += 1
    return Path(base), rest


def failure_file(argv: Sequence[str], environ: Mapping[str, str]) -> Path:
    """Where to report a failure, even when the settings themselves could not be resolved."""
    base, _ = base_dir_from(argv, environ)
    return Path(environ.get("SM_OUTPUT_DIR") or base / "output") / "failure"
