"""Batch Transform: classify every image under an S3 prefix, one JSON answer per image, or every
line of JSON Lines files, one answer line per input line."""

from __future__ import annotations

from sagemaker.model import Model

from deploy import sdk
from deploy.predict import GENERIC_IMAGE

JSON = "application/json"
JSON_LINES = "application/jsonlines"


def transform(model: Model, *, data: str, output_path: str, instance_type: str, instance_count: int = 1,
              max_payload_mb: int = 6, max_concurrent_transforms: int | None = None,
              job_name: str | None = None, wait: bool = True, json_lines: bool = False) -> str:
    """Start a transform job over ``data`` (an S3 prefix, or ``file://`` in local mode); returns the
    job name.

    Each object is sent whole as one request (SingleRecord, no splitting), so the output holds
    ``<object>.out`` with that image's ``{"predictions": [...]}``. ``application/x-image`` lets
    the server sniff JPEG, PNG and the rest from the bytes, whatever the object names.

    With ``json_lines``, each object is a JSON Lines file with one instance per line
    (``{"b64": "<base64 image>"}``): it is split on lines and sent in mini-batches of whole lines
    up to ``max_payload_mb`` (MultiRecord), and ``<object>.out`` holds one ``{"predictions": [...]}``
    line per input line, in order. The server refuses a mini-batch holding a bad instance whole,
    naming the instance, so that no answer can land on the wrong line.
    """
    transformer = model.transformer(
        instance_count=instance_count,
        instance_type=instance_type,
        strategy="MultiRecord" if json_lines else "SingleRecord",
        assemble_with="Line" if json_lines else None,
        max_payload=max_payload_mb,
        max_concurrent_transforms=max_concurrent_transforms,
        output_path=output_path,
        accept=JSON_LINES if json_lines else JSON,
    )
    # Local mode has no CloudWatch logs to follow (the SDK would ask AWS for them, with credentials);
    # the container's output is already printed while the job runs.
    logs = wait and not sdk.is_local(transformer.sagemaker_session)
    transformer.transform(data=data, data_type="S3Prefix", content_type=JSON_LINES if json_lines else GENERIC_IMAGE,
                          split_type="Line" if json_lines else None, job_name=job_name, wait=wait, logs=logs)
    return transformer.latest_transform_job.name
