"""Batch Transform: classify every image under an S3 prefix, one JSON answer per image, or every
line of JSON Lines files, one answer line per input line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deploy.predict import GENERIC_IMAGE
from deploy.session import SageMaker, timestamped
from deploy.training import Security

JSON = "application/json"
JSON_LINES = "application/jsonlines"
POLL_S = 15.0
TERMINAL = ("Completed", "Failed", "Stopped")


def transform(sagemaker: SageMaker, model_name: str, *, data: str, output_path: str, instance_type: str,
              instance_count: int = 1, max_payload_mb: int = 6, max_concurrent_transforms: int | None = None,
              job_name: str | None = None, wait: bool = True, json_lines: bool = False,
              security: Security | None = None, sleep: Callable[[float], None] = time.sleep) -> str:
    """Start a transform job over ``data`` (an S3 prefix, or ``file://`` in local mode) with the
    model ``model_name``; returns the job name. With ``wait``, returns once it has ended and raises
    if it failed (local mode runs it to the end in this call).

    Each object is sent whole as one request (SingleRecord, no splitting), so the output holds
    ``<object>.out`` with that image's ``{"predictions": [...]}``. ``application/x-image`` lets
    the server sniff JPEG, PNG and the rest from the bytes, whatever the object names.

    With ``json_lines``, each object is a JSON Lines file with one instance per line
    (``{"b64": "<base64 image>"}``): it is split on lines and sent in mini-batches of whole lines
    up to ``max_payload_mb`` (MultiRecord), and ``<object>.out`` holds one ``{"predictions": [...]}``
    line per input line, in order. The server refuses a mini-batch holding a bad instance whole,
    naming the instance, so that no answer can land on the wrong line.
    """
    name = job_name or timestamped("image-classifier-transform")
    source: dict[str, Any] = {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": data}},
                              "ContentType": JSON_LINES if json_lines else GENERIC_IMAGE}
    output: dict[str, Any] = {"S3OutputPath": output_path, "Accept": JSON_LINES if json_lines else JSON}
    if json_lines:
        source["SplitType"] = "Line"
        output["AssembleWith"] = "Line"
    request: dict[str, Any] = {
        "TransformJobName": name, "ModelName": model_name, "TransformInput": source, "TransformOutput": output,
        "TransformResources": {"InstanceType": instance_type, "InstanceCount": instance_count},
        "BatchStrategy": "MultiRecord" if json_lines else "SingleRecord", "MaxPayloadInMB": max_payload_mb,
    }
    if max_concurrent_transforms is not None:
        request["MaxConcurrentTransforms"] = max_concurrent_transforms
    security = security or Security()
    if security.kms_key:
        output["KmsKeyId"] = security.kms_key
        request["TransformResources"]["VolumeKmsKeyId"] = security.kms_key
    request.update(security.tag_list())
    sagemaker.sagemaker.create_transform_job(**request)
    while wait:
        description = sagemaker.sagemaker.describe_transform_job(TransformJobName=name)
        status = description["TransformJobStatus"]
        if status in ("Failed", "Stopped"):
            raise RuntimeError(f"transform job {name} {status.lower()}: "
                               f"{description.get('FailureReason', 'no reason given')}")
        if status in TERMINAL:
            break
        sleep(POLL_S)
    return name
