"""One epoch of training and one pass of evaluation."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    *,
    log_every_s: float = 30.0,
) -> dict[str, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    started = last_log = time.perf_counter()
    num_batches = len(loader) if hasattr(loader, "__len__") else 0
    for step, (images, targets) in enumerate(loader, start=1):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(dim=1) == targets).sum().item()
        seen += len(targets)
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            rate = seen / (now - started)
            eta = (num_batches - step) * (now - started) / step
            logger.info(
                "epoch %d step %d/%d loss %.4f %.1f img/s eta %.0fs",
                epoch, step, num_batches, total_loss / seen, rate, eta,
            )
            last_log = now
    elapsed = time.perf_counter() - started
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "images_per_second": seen / elapsed if elapsed > 0 else 0.0,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
) -> dict[str, float]:
    model.eval()
    total_loss, correct, correct_top5, seen = 0.0, 0, 0, 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        total_loss += criterion(logits, targets).item() * len(targets)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct += (top[:, 0] == targets).sum().item()
        correct_top5 += (top == targets[:, None]).any(dim=1).sum().item()
        seen += len(targets)
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "top5_accuracy": correct_top5 / max(seen, 1),
    }
