"""Checkpoints mirrored to S3 and the EC2 spot interruption notice, for runs outside SageMaker.

SageMaker syncs ``/opt/ml/checkpoints`` with the job's checkpoint S3 URI and sends SIGTERM before
a spot interruption. On EC2 (or anywhere else) nothing does either, so with
``--checkpoint-s3-uri`` the prefix's checkpoints that are newer than the folder's are downloaded
first (a new instance resumes where the interrupted one stopped), each checkpoint is uploaded
once written, in the background, the newest before the run ends, and older checkpoints the folder
no longer keeps are deleted from the prefix. With ``--spot``, the instance metadata service is
polled for the two-minute interruption notice, which stops the run as SIGTERM does: a
checkpoint, then exit.
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

from train import checkpoint
from train.errors import CheckpointSyncError
from train.settings import split_s3_uri

logger = logging.getLogger(__name__)


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

    def _remote(self) -> set[str]:
        """The checkpoint file names directly under the prefix."""
        found: set[str] = set()
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix):]
                    if "/" not in name and Path(name).match(checkpoint.PATTERN):
                        found.add(name)
        except Exception as exc:
            raise CheckpointSyncError(f"checkpoints: cannot list {self.uri}: {exc}") from exc
        return found

    def restore(self) -> list[str]:
        """Download the prefix's newest checkpoints that are newer than the folder's; their names."""
        local = [path.name for path in checkpoint.list_checkpoints(self.directory)]
        names = [name for name in sorted(self._remote())[-checkpoint.KEEP:] if not local or name > local[-1]]
        if local and not names:
            logger.info("checkpoints: %s is as new as %s", self.directory, self.uri)
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            temporary = self.directory / f".{name}.download"
            try:
                self.client.download_file(self.bucket, self.prefix + name, str(temporary))
                os.replace(temporary, self.directory / name)
                self._in_s3[name] = _version(self.directory / name)
            except Exception as exc:
                temporary.unlink(missing_ok=True)
                raise CheckpointSyncError(f"checkpoints: cannot download {self.uri}{name}: {exc}") from exc
        if names:
            logger.info("checkpoints: downloaded %s from %s", ", ".join(names), self.uri)
        return names

    def sync(self) -> None:
        """Upload the folder's checkpoints the prefix lacks; delete the older ones the folder no
        longer has (never one newer than the folder's newest: another run's)."""
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
                    raise CheckpointSyncError(f"checkpoints: cannot upload {name} to {self.uri}: {exc}") from exc
                self._in_s3[name] = version
                logger.info("checkpoints: uploaded %s to %s", name, self.uri)
            for name in sorted(name for name in remote - set(local) if local and name < max(local)):
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


def spot_interruption_notice(endpoint: str, timeout_s: float = 2.0) -> str | None:
    """The instance-action document when EC2 has scheduled this spot instance's interruption, else
    None. IMDSv2 (a session token) first; IMDSv1 when no token is given (a container behind a
    metadata hop limit of 1)."""
    return _ask_for_notice(endpoint, timeout_s)[1]


def _ask_for_notice(endpoint: str, timeout_s: float) -> tuple[bool, str | None]:
    """(whether the metadata service answered the question at all, the notice if there is one)."""
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
            return True, response.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # no interruption scheduled
            return True, None
        logger.debug("spot notice: %s", exc)
    except (urllib.error.URLError, OSError) as exc:
        logger.debug("spot notice: %s", exc)
    return False, None


def watch_for_spot_notice(stop: threading.Event, endpoint: str, poll_s: float,
                          done: threading.Event) -> threading.Thread:
    """A daemon thread that sets ``stop`` when the interruption notice appears; it ends then, or
    once ``stop`` or ``done`` is set. A metadata service that does not answer is reported once."""

    def watch() -> None:
        warned = False
        while not (stop.is_set() or done.is_set()):
            answered, notice = _ask_for_notice(endpoint, timeout_s=2.0)
            if notice is not None:
                logger.warning("spot interruption notice (%s): checkpointing and stopping", notice.strip())
                stop.set()
                return
            if not answered and not warned:
                warned = True
                logger.warning("spot notice: the instance metadata service at %s does not answer (from a "
                               "container, IMDSv2 needs a metadata hop limit of 2): an interruption notice "
                               "would go unseen", endpoint)
            done.wait(poll_s)

    thread = threading.Thread(target=watch, name="spot-notice", daemon=True)
    thread.start()
    return thread
