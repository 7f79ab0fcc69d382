"""Server settings, read once from an environment mapping (``Settings.from_env(os.environ)``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from classifier.parsing import parse_bool

T = TypeVar("T")
DEFAULT_PORT = 8080
MEGABYTE = 1024 * 1024


class ConfigError(ValueError):
    """An environment variable has a value the server cannot use."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    model_dir: Path = Path("/opt/ml/model")
    # With no artifact in model_dir, serve the ImageNet EfficientNet-Lite0 shipped in the image.
    default_model: bool = True
    top_k: int = 5
    max_body_bytes: int = 6 * MEGABYTE
    max_image_pixels: int = 40_000_000
    device: str = "auto"
    log_level: str = "INFO"
    log_json: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        def get(key: str, parse: Callable[[str], T], default: T) -> T:
            raw = environ.get(key)
            if raw is None or raw == "":
                return default
            try:
                return parse(raw)
            except ValueError as exc:
                raise ConfigError(f"environment variable {key}={raw!r} is invalid: {exc}") from None

        base_dir = Path(environ.get("SAGEMAKER_BASE_DIR") or "/opt/ml")
        max_mb = get("CLASSIFIER_MAX_BODY_MB", _positive_float, get("SAGEMAKER_MAX_PAYLOAD_IN_MB", _positive_float, 6.0))
        return cls(
            host=environ.get("CLASSIFIER_HOST") or cls.host,
            port=get("SAGEMAKER_BIND_TO_PORT", _positive_int, DEFAULT_PORT),
            model_dir=Path(environ.get("SM_MODEL_DIR") or base_dir / "model"),
            default_model=get("CLASSIFIER_DEFAULT_MODEL", parse_bool, cls.default_model),
            top_k=get("CLASSIFIER_TOP_K", _positive_int, cls.top_k),
            max_body_bytes=int(max_mb * MEGABYTE),
            max_image_pixels=get("CLASSIFIER_MAX_IMAGE_PIXELS", _positive_int, cls.max_image_pixels),
            device=environ.get("CLASSIFIER_DEVICE") or cls.device,
            log_level=(environ.get("LOG_LEVEL") or cls.log_level).upper(),
            log_json=get("LOG_FORMAT", lambda v: v.strip().lower() == "json", cls.log_json),
        )
