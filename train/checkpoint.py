"""Full training state on disk, so a stopped or interrupted (spot) job resumes where it was.

Checkpoints go to ``/opt/ml/checkpoints``, which SageMaker syncs with S3 when a checkpoint
configuration is set. Each is written to a temporary name and renamed, so a checkpoint that
exists is complete; loading still falls back to an older one if the newest cannot be read.
"""

from __future__ import annotations

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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, state: dict[str, Any], global_step: int) -> Path:
    """Write ``state`` as checkpoint number ``global_step``; keep the newest few."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"checkpoint-{global_step:010d}.pt"
    temporary = directory / f".{target.name}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, target)
    for old in sorted(directory.glob(PATTERN))[:-KEEP]:
        old.unlink(missing_ok=True)
    logger.info("checkpoint written: %s (epoch %d, step %d)", target, state["epoch"], state["step_in_epoch"])
    return target


def load_latest(directory: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``directory``, or None when there is none."""
    for path in sorted(directory.glob(PATTERN), reverse=True):
        try:
            # Our own files, written by this program; they hold optimizer and RNG state objects.
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            logger.warning("ignoring unreadable checkpoint %s: %s", path, exc)
            continue
        logger.info("resuming from %s (epoch %d, step %d)", path, state["epoch"], state["step_in_epoch"])
        return state
    return None
