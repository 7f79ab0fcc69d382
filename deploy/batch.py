"""Batch Transform: classify every image under an S3 prefix, one JSON answer per image."""

from __future__ import annotations

from sagemaker.model import Model

from deploy.predict import GENERIC_IMAGE


def transform(model: Model, *, data: str, output_path: str, instance_type: str, instance_count: int = 1,
              max_payload_mb: int = 6, max_concurrent_transforms: int | None = None,
              job_name: str | None = None, wait: bool = True) -> str:
    """Start a transform job over ``data`` (an S3 prefix); returns the job name.

    Each object is sent whole as one request (SingleRecord, no splitting), so the output holds
    ``<object>.out`` with that image's ``{"predictions": [...]}``. ``application/x-image`` lets
    the server sniff JPEG, PNG and the rest from the bytes, whatever the object names.
    """
    transformer = model.transformer(
        instance_count=instance_count,
        instance_type=instance_type,
        strategy="SingleRecord",
        max_payload=max_payload_mb,
        max_concurrent_transforms=max_concurrent_transforms,
        output_path=output_path,
        accept="application/json",
    )
    transformer.transform(data=data, data_type="S3Prefix", content_type=GENERIC_IMAGE, split_type=None,
                          job_name=job_name, wait=wait, logs=wait)
    return transformer.latest_transform_job.name
