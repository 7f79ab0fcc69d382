"""Checkpoints mirrored to S3 and the EC2 spot interruption notice, for runs outside SageMaker.

SageMaker syncs ``/opt/ml/checkpoints`` with the job's checkpoint S3 URI and sends SIGTERM before
a spot interruption. On EC2 (or anywhere else) nothing does either, so with
``--checkpoint-s3-uri`` the checkpoint folder is filled from S3 when it holds no checkpoint (a new
instance resumes where the interrupted one stopped), each checkpoint is uploaded once written, in
the background, and the newest is uploaded before the run ends, checkpoints the folder no longer
keeps are deleted from the prefix. With ``--spot``, the instance metadata service is polled for
the two-minute interruption notice, which stops the run as SIGTERM does: a checkpoint, then exit.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from train import checkpoint

logger = logging.getLogger(__name__)

IMDS_ENDPOINT = "http://169.254.169.254"  # botocore's AWS_EC2_METADATA_SERVICE_ENDPOINT overrides it
SPOT_POLL_S = 5.0


class CheckpointSyncError(Exception):
    """The checkpoints could not be read from or written to S3."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix/")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"checkpoint S3 URI must look like s3://bucket/prefix/, not {uri!r}")
    prefix = parsed.path.lstrip("/")
    return parsed.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/"


class S3Checkpoints:
    """The checkpoint folder's ``checkpoint-*.pt`` files, mirrored at an S3 prefix."""

    def __init__(self, uri: str, directory: Path, client: Any = None) -> None:
        self.uri = uri
        self.bucket, self.prefix = split_s3_uri(uri)
        self.directory = directory
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future[None] | None = None
        self._lock = threading.Lock()
        # name -> (size, mtime) of the local file as last uploaded or downloaded: a checkpoint may be
        # rewritten under the same name, so the prefix holding a file of that name proves nothing.
        self._in_s3: dict[str, tuple[int, int]] = {}

    def _remote(self) -> dict[str, int]:
        """Checkpoint file name -> size, under the prefix."""
        found: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix):]
                    if "/" not in name and Path(name).match(checkpoint.PATTERN):
                        found[name] = item["Size"]
        except Exception as exc:
            raise CheckpointSyncError(f"cannot list {self.uri}: {exc}") from exc
        return found

    def restore(self) -> list[str]:
        """Download the prefix's newest checkpoints when the folder holds none; their names."""
        if checkpoint.list_checkpoints(self.directory):
            logger.info("checkpoints: resuming from %s (not downloading %s)", self.directory, self.uri)
            return []
        names = sorted(self._remote())[-checkpoint.KEEP:]
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            temporary = self.directory / f".{name}.download"
            try:
                self.client.download_file(self.bucket, self.prefix + name, str(temporary))
                os.replace(temporary, self.directory / name)
                self._in_s3[name] = _version(self.directory / name)
            except Exception as exc:
                temporary.unlink(missing_ok=True)
                raise CheckpointSyncError(f"cannot download {self.uri}{name}: {exc}") from exc
        if names:
            logger.info("checkpoints: downloaded %s from %s", ", ".join(names), self.uri)
        return names

    def sync(self) -> None:
        """Upload the folder's checkpoints the prefix lacks; delete those the folder no longer has."""
        with self._lock:
            local = {path.name: path for path in checkpoint.list_checkpoints(self.directory)}
            remote = self._remote()
            for name, path in sorted(local.items()):
                try:
                    version = _version(path)
                    if name in remote and self._in_s3.get(name) == version:
                        continue
                    self.client.upload_file(str(path), self.bucket, self.prefix + name)
                except FileNotFoundError:
                    continue  # pruned by a newer checkpoint meanwhile
                except Exception as exc:
                    raise CheckpointSyncError(f"cannot upload {name} to {self.uri}: {exc}") from exc
                self._in_s3[name] = version
                logger.info("checkpoints: uploaded %s to %s", name, self.uri)
            for name in sorted(set(remote) - set(local)):
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)
                except Exception as exc:
                    logger.warning("checkpoints: could not delete %s%s: %s", self.uri, name, exc)

    def sync_in_background(self) -> None:
        """Start a sync unless one is waiting to start (it will see this checkpoint too)."""
        if self._pending is not None and not self._pending.running() and not self._pending.done():
            return
        self._pending = self._uploads.submit(self._sync_logged)

    def _sync_logged(self) -> None:
        try:
            self.sync()
        except CheckpointSyncError as exc:
            logger.warning("checkpoints: %s (retried at the next checkpoint)", exc)

    def flush(self) -> None:
        """Wait for background uploads, then sync once more: raises if the newest is not in S3."""
        self._uploads.shutdown(wait=True)
        self.sync()


def _version(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def imds_endpoint(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    return (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_ENDPOINT).rstrip("/")


def spot_interruption_notice(endpoint: str, timeout_s: float = 2.0) -> str | None:
    """The instance-action document when EC2 has scheduled this spot instance's interruption, else
    None. IMDSv2 (a session token) first; IMDSv1 when no token is given (a container behind a
    metadata hop limit of 1)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {}
    try:
        token_request = urllib.request.Request(f"{endpoint}/latest/api/token", method="PUT",
                                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with opener.open(token_request, timeout=timeout_s) as response:
            headers["X-aws-ec2-metadata-token"] = response.read().decode()
    except (urllib.error.URLError, OSError):
        pass
    request = urllib.request.Request(f"{endpoint}/latest/meta-data/spot/instance-action", headers=headers)
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code != 404:  # 404: no interruption scheduled
            logger.debug("spot notice: %s", exc)
    except (urllib.error.URLError, OSError) as exc:
        logger.debug("spot notice: %s", exc)
    return None


def watch_for_spot_notice(stop: threading.Event, endpoint: str, poll_s: float = SPOT_POLL_S) -> threading.Thread:
    """A daemon thread that sets ``stop`` when the interruption notice appears (or ``stop`` is set)."""

    def watch() -> None:
        while not stop.is_set():
            notice = spot_interruption_notice(endpoint)
            if notice is not None:
                logger.warning("spot interruption notice (%s): checkpointing and stopping", notice.strip())
                stop.set()
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=watch, name="spot-notice", daemon=True)
    thread.start()
    return thread
