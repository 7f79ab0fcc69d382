"""Where every command sends its SageMaker API calls: AWS (boto3), or the SageMaker Python SDK's
local mode (containers on this machine), with SDK v2 or v3, whichever is installed.

Commands build the API's own requests (``CreateTrainingJob``, ``CreateModel``, ...) and send them
to ``sagemaker``/``runtime``: boto3's clients in AWS, the SDK's local clients in local mode, which
take the same requests and run them with Docker. So one code path serves both, no SDK is needed
for AWS, and a user on SDK v3 need not install v2 for local mode.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

logger = logging.getLogger(__name__)
# Local mode never assumes the role, but the API's requests need one.
LOCAL_ROLE = "arn:aws:iam::000000000000:role/sagemaker-local-mode"
LOCAL_INSTANCE_TYPES = ("local", "local_gpu")
DEFAULT_LOCAL_PORT = 8080
# The SDK's local session: v3's module first, then v2's.
LOCAL_SESSION_MODULES = ("sagemaker.core.local.local_session", "sagemaker.local")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def timestamped(prefix: str, limit: int = 63, *, short: bool = False) -> str:
    """``<prefix>-<UTC time to the millisecond>`` (``short``: to the second, two-digit year),
    the prefix cut to fit SageMaker's name limit."""
    now = datetime.now(UTC)
    stamp = now.strftime("%y%m%d-%H%M%S") if short else now.strftime("%Y-%m-%d-%H-%M-%S-%f")[:-3]
    return f"{prefix[:limit - len(stamp) - 1].rstrip('-')}-{stamp}"


@dataclass
class SageMaker:
    """The API clients one command uses."""

    boto_session: boto3.Session
    sagemaker: Any  # the SageMaker API: a boto3 client, or the SDK's LocalSagemakerClient
    runtime: Any  # sagemaker-runtime: InvokeEndpoint
    local: bool = False
    sdk_session: Any = None  # local mode: the SDK's LocalSession behind the clients

    def client(self, service: str) -> Any:
        """Another AWS service's boto3 client (S3, Application Auto Scaling, CloudWatch, ...)."""
        return self.boto_session.client(service)

    def default_bucket(self) -> str:
        """SageMaker's default bucket, ``sagemaker-<region>-<account>``, created if missing (as the
        SDK does)."""
        region = self.boto_session.region_name
        account = self.client("sts").get_caller_identity()["Account"]
        bucket = f"sagemaker-{region}-{account}"
        s3 = self.client("s3")
        try:  # the name is predictable: the bucket must be this account's, not anyone's
            s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
            return bucket
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code not in ("404", "NoSuchBucket"):
                raise ValueError(f"the default bucket {bucket} is not usable ({code}: it may belong to another "
                                 "account): pass --output-path s3://your-bucket/prefix/") from None
        location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            s3.create_bucket(Bucket=bucket, **location)
            logger.info("created the default bucket %s", bucket)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "OperationAborted"):
                raise
        return bucket


def sdk_config_files(environ: Mapping[str, str]) -> list[Path]:
    """The SageMaker SDK's config files that exist (admin and user, as the SDK looks for them)."""
    candidates = [environ.get("SAGEMAKER_ADMIN_CONFIG_OVERRIDE") or "/etc/xdg/sagemaker/config.yaml",
                  environ.get("SAGEMAKER_USER_CONFIG_OVERRIDE")
                  or str(Path(environ.get("HOME") or Path.home()) / ".config" / "sagemaker" / "config.yaml")]
    return [Path(path) for path in candidates if path.endswith((".yaml", ".yml")) and Path(path).is_file()]


def aws(boto_session: boto3.Session) -> SageMaker:
    if boto_session.region_name is None:
        raise ValueError("no AWS region: pass --region or set AWS_DEFAULT_REGION (or a region in ~/.aws/config)")
    # Invocations may take SageMaker's full 60 s: read for longer than that, retry what may pass.
    runtime = boto_session.client("sagemaker-runtime", config=Config(read_timeout=70, retries={"mode": "standard"}))
    return SageMaker(boto_session, boto_session.client("sagemaker"), runtime)


def local_session_class() -> type:
    """The installed SDK's ``LocalSession`` (v3 or v2)."""
    for name in LOCAL_SESSION_MODULES:
        try:
            return importlib.import_module(name).LocalSession
        except ModuleNotFoundError as error:
            if not (error.name and name.startswith(error.name)):  # the module is there but broken: say so
                raise
    raise RuntimeError("local mode runs on the SageMaker Python SDK (v2 or v3): pip install sagemaker")


def local(boto_session: boto3.Session, *, port: int = DEFAULT_LOCAL_PORT, container_root: str | None = None) -> SageMaker:
    """Local mode: ``file://`` inputs and outputs work without credentials (a region is still needed).

    ``local_code`` keeps everything on this machine; ``serving_port`` is the host port of local
    endpoints; ``container_root`` is where the SDK writes its compose files and the containers'
    /opt/ml folders (the system temp folder by default). Telemetry is off unless the user's SDK
    configuration turns it on: a deployment tool talks only to what it was asked to use.
    """
    if boto_session.region_name is None:
        raise ValueError("no AWS region: local mode needs one too (--region or AWS_DEFAULT_REGION)")
    session_class = local_session_class()
    config = _sdk_config(session_class)
    session = session_class(boto_session=boto_session, sagemaker_config=config)
    settings: dict[str, Any] = {"local_code": True, "serving_port": port}
    if container_root:
        Path(container_root).mkdir(parents=True, exist_ok=True)  # the SDK expects it to exist
        settings["container_root"] = str(Path(container_root).resolve())
    session.config = {"local": settings}
    return SageMaker(boto_session, session.sagemaker_client, session.sagemaker_runtime_client, local=True,
                     sdk_session=session)


def _sdk_config(session_class: type) -> dict[str, Any]:
    """The user's SDK defaults (its config.yaml files), with telemetry off unless they turned it on."""
    loader = importlib.import_module(session_class.__module__).load_sagemaker_config
    config = dict(loader())
    config.setdefault("SchemaVersion", "1.0")
    modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
    modules.setdefault("TelemetryOptOut", True)
    return config
