"""Full training state on disk, so a stopped or interrupted (spot) job resumes where it was.

This module owns both directions: :func:`capture` and :func:`save_on_main` write what
:func:`load_on_every_process` and :func:`restore` read back.

Checkpoints go to ``/opt/ml/checkpoints``, which SageMaker syncs with S3 when a checkpoint
configuration is set. Each is written to a temporary name, flushed to disk and renamed, so a
checkpoint that exists is complete; loading still falls back to an older one if the newest cannot
be read.

A checkpoint holds tensors and plain data only (numbers, strings, lists, dicts), and is read with
``weights_only=True``: whoever can write to the checkpoint prefix cannot make the job run code.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from train.distributed import from_main_process
from train.errors import CheckpointError, SettingsError

logger = logging.getLogger(__name__)
PATTERN = "checkpoint-*.pt"
KEEP = 2


@dataclass
class Progress:
    """Where a run is and what it has seen: the training loop's state besides the tensors it trains."""

    epoch: int = 1  # the epoch being run (1-based)
    step_in_epoch: int = 0  # steps of it done; an epoch's number of steps when it is finished
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    best_score: float = -1.0  # the best epoch's validation accuracy (mAP for multi-label)
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None  # the model's state dict at best_epoch
    stale_epochs: int = 0  # epochs since best_epoch


@dataclass(frozen=True)
class Trainee:
    """What a checkpoint holds tensors of, and what they must fit when read back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    architecture: str
    class_names: tuple[str, ...]
    task: str  # multiclass or multilabel


# Progress fields stored under the names checkpoints have always used.
STORED_AS = {"best_weights": "best_state", "best_score": "best_accuracy"}


def capture(progress: Progress, trainee: Trainee, settings: dict[str, Any]) -> dict[str, Any]:
    """The whole training state as a checkpoint: tensors and plain data only (see above)."""
    position = {STORED_AS.get(f.name, f.name): getattr(progress, f.name) for f in fields(progress)}
    return {
        **position,
        "architecture": trainee.architecture,
        "class_names": list(trainee.class_names),
        "model": trainee.model.state_dict(),
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "scaler": trainee.scaler.state_dict() if trainee.scaler is not None else None,
        "rng": rng_state(),
        "settings": settings,
    }


def restore(state: dict[str, Any], trainee: Trainee) -> Progress:
    """Load a checkpoint into ``trainee`` (and the random generators); the progress it recorded."""
    task = state.get("settings", {}).get("hyperparameters", {}).get("task", "multiclass")
    made_for = (state["architecture"], tuple(state["class_names"]), task)
    if made_for != (trainee.architecture, trainee.class_names, trainee.task):
        raise SettingsError(
            f"the checkpoint folder holds a checkpoint of another run ({made_for[0]} with "
            f"{len(made_for[1])} classes, task={task}); remove it or choose another checkpoint folder"
        )
    trainee.model.load_state_dict(state["model"])
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    if trainee.scaler is not None and state.get("scaler"):
        trainee.scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    return Progress(**{f.name: state[STORED_AS.get(f.name, f.name)] for f in fields(Progress)})


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


def save_on_main(directory: Path, state: Callable[[], dict[str, Any]], global_step: int, rank: int,
                 device: torch.device, *, stopping: bool) -> None:
    """Rank 0 writes the checkpoint ``state()`` and every process learns whether that worked, so
    that a failed write (a full disk) stops all of them with one reason, rather than leaving the
    others waiting for rank 0 at the next collective, or exiting as if it had been written."""
    code, failure = 0, None
    if rank == 0:
        try:
            save(directory, state(), global_step)
        except Exception as exc:
            logger.exception("could not write checkpoint %d to %s", global_step, directory)
            cause = os_error_behind(exc)
            code, failure = (cause.errno if cause is not None and cause.errno else -1), exc
    code = from_main_process(code, device)
    if code:
        when = " on SIGTERM" if stopping else ""
        if code > 0:
            reason = f"{os.strerror(code)} (errno {code})"
        else:
            reason = f"{type(failure).__name__}: {failure}" if failure else "see the log of rank 0"
        advice = "; free space there or give the job a larger volume" if code == errno.ENOSPC else ""
        raise CheckpointError(
            f"the checkpoint of step {global_step}{when} could not be written to {directory}: {reason}{advice}. "
            "Started again, the job resumes from the newest complete checkpoint, if any"
        ) from failure


def load_on_every_process(directory: Path, rank: int, device: torch.device) -> dict[str, Any] | None:
    """Rank 0's newest checkpoint (checkpoints live on rank 0's host), on every process. It travels
    as the bytes of its file and is read back with ``weights_only=True``: no pickles between ranks."""
    state = load_latest(directory) if rank == 0 else None
    if not dist.is_initialized():
        return state
    data = to_bytes(state) if rank == 0 and state is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if size.item() == 0:
        return None
    if rank == 0:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=0)
    return state if rank == 0 else from_bytes(payload.cpu().numpy().tobytes())


def to_bytes(state: dict[str, Any]) -> bytes:
    """A checkpoint as bytes, to hand to other processes (read back with :func:`from_bytes`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
