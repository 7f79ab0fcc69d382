"""Full training state on disk, so a stopped or interrupted (spot) job resumes where it was.

Checkpoints go to ``/opt/ml/checkpoints``, which SageMaker syncs with S3 when a checkpoint
configuration is set. Each is written to a temporary name, flushed to disk and renamed, so a
checkpoint that exists is complete; loading still falls back to an older one if the newest cannot
be read.

A checkpoint holds tensors and plain data only (numbers, strings, lists, dicts), and is read with
``weights_only=True``: whoever can write to the checkpoint prefix cannot make the job run code.
"""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)
PATTERN = "checkpoint-*.pt"
KEEP = 2


class CheckpointError(Exception):
    """A checkpoint could not be written; no partial file of it is left in the folder."""


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.copy()), position, has_gauss, gauss]  # tensors, not arrays
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, state: dict[str, Any], global_step: int) -> Path:
    """Write ``state`` as checkpoint number ``global_step``; keep the newest few."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"checkpoint-{global_step:010d}.pt"
    temporary = directory / f".{target.name}.tmp"
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise
    for old in list_checkpoints(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
    logger.info("checkpoint written: %s (epoch %d, step %d)", target, state["epoch"], state["step_in_epoch"])
    return target


def os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError behind a failed :func:`save`, if any: torch's archive writer may report a failed
    write (a full disk) as a RuntimeError that has the OSError as its context."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def list_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first."""
    return sorted(directory.glob(PATTERN))


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``directory``, or None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            logger.warning("ignoring unreadable checkpoint %s: %s", path, exc)
            continue
        logger.info("resuming from %s (epoch %d, step %d)", path, state["epoch"], state["step_in_epoch"])
        return state
    return None


def to_bytes(state: dict[str, Any]) -> bytes:
    """A checkpoint as bytes, to hand to other processes (read back with :func:`from_bytes`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
