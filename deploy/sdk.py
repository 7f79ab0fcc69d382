"""The SDK sessions every command runs in: AWS, or local mode (containers on this machine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
from sagemaker.config import load_sagemaker_config
from sagemaker.local import LocalSession
from sagemaker.session import Session

# Local mode never assumes the role, but the SDK's Estimator and Model insist on one.
LOCAL_ROLE = "arn:aws:iam::000000000000:role/sagemaker-local-mode"
LOCAL_INSTANCE_TYPES = ("local", "local_gpu")
DEFAULT_LOCAL_PORT = 8080


def sdk_config(loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The user's SDK defaults (config.yaml files), with telemetry off unless they turned it on.

    SDK v2 otherwise sends a request to an AWS telemetry bucket after every call it tracks, local
    mode included; a deployment tool should only talk to the endpoints it was asked to use.
    """
    config = dict(loaded if loaded is not None else load_sagemaker_config())
    config.setdefault("SchemaVersion", "1.0")
    modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
    modules.setdefault("TelemetryOptOut", True)
    return config


def aws_session(boto_session: boto3.Session, *, default_bucket: str | None = None) -> Session:
    return Session(boto_session=boto_session, default_bucket=default_bucket, sagemaker_config=sdk_config())


def local_session(boto_session: boto3.Session, *, port: int = DEFAULT_LOCAL_PORT,
                  container_root: str | None = None) -> LocalSession:
    """A local-mode session: ``file://`` inputs and outputs work without credentials.

    ``local_code`` keeps everything on this machine; ``serving_port`` is the host port of local
    endpoints (8080 unless told otherwise); ``container_root`` is where the SDK writes its compose
    files and the containers' /opt/ml folders (the system temp folder by default).
    """
    session = LocalSession(boto_session=boto_session, sagemaker_config=sdk_config())
    local: dict[str, Any] = {"local_code": True, "serving_port": port}
    if container_root:
        Path(container_root).mkdir(parents=True, exist_ok=True)  # the SDK expects it to exist
        local["container_root"] = str(Path(container_root).resolve())
    session.config = {"local": local}
    return session


def is_local(session: Session) -> bool:
    return bool(getattr(session, "local_mode", False))
