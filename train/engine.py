"""One epoch of training and one pass of evaluation; metrics summed over all processes."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from train import multilabel
from train.distributed import all_gather_rows, all_reduce_sum

logger = logging.getLogger(__name__)


@dataclass
class Execution:
    """How the model's passes run: in mixed precision (autocast, and the gradient scaler it needs)
    or not, and with inputs in the channels_last memory layout or not."""

    amp: bool = False
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = field(default=None)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def right_answers(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Images whose top class is their label; for multi-label (0/1 targets, one row an image), the
    share of each image's label decisions at probability 0.5 that are right, summed over images."""
    if targets.ndim == 2:
        return ((logits > 0) == (targets > 0.5)).float().mean(dim=1).sum().item()
    return (logits.argmax(dim=1) == targets).sum().item()


def memory_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    *,
    execution: Execution | None = None,
    start_step: int = 0,
    after_step: Callable[[int], bool] = lambda step: False,
    log_every_s: float = 30.0,
) -> dict[str, float]:
    """Train over ``loader``; ``after_step(step)`` may checkpoint and returns True to stop early.

    Returns loss, accuracy and throughput of the steps run, and ``completed`` (0.0 if stopped).
    """
    execution = execution or Execution()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    started = last_log = time.perf_counter()
    num_batches = start_step + len(loader)  # type: ignore[arg-type]
    interactive = sys.stderr.isatty()
    completed = 1.0
    for step, (images, targets) in enumerate(loader, start=start_step + 1):
        images = execution.prepare(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        with execution.autocast(device):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if execution.scaler is not None:
            execution.scaler.scale(loss).backward()
            execution.scaler.step(optimizer)
            execution.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()

        total_loss += loss.item() * len(targets)
        correct += right_answers(logits, targets)
        seen += len(targets)
        now = time.perf_counter()
        if interactive or now - last_log >= log_every_s:
            rate = seen / (now - started)
            eta = (num_batches - step) * (now - started) / (step - start_step)
            message = (f"epoch {epoch} step {step}/{num_batches} loss {total_loss / seen:.4f} "
                       f"{rate:.1f} img/s eta {eta:.0f}s {memory_in_use(device)}")
            if interactive:
                print(f"\r{message}", end="", file=sys.stderr, flush=True)
            else:
                logger.info(message)
            last_log = now
        if after_step(step):
            completed = 0.0
            break
    if interactive:
        print(file=sys.stderr)
    elapsed = time.perf_counter() - started
    total_loss, correct, seen = all_reduce_sum([total_loss, correct, seen], device)
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "images_per_second": seen / elapsed if elapsed > 0 else 0.0,
        "completed": completed,
    }


def _logits(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
            execution: Execution) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The model's logits for each batch of ``loader`` in evaluation mode, with the batch's targets."""
    model.eval()
    for images, targets in loader:
        images = execution.prepare(images.to(device, non_blocking=True))
        with execution.autocast(device):
            logits = model(images)
        yield logits, targets.to(device, non_blocking=True)  # outside autocast: the caller's metrics in float32


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
    *,
    execution: Execution | None = None,
    predictions: list[tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy; (target, predicted) pairs appended to ``predictions``."""
    total_loss, correct, correct_top5, seen = 0.0, 0, 0, 0
    for logits, targets in _logits(model, loader, device, execution or Execution()):
        total_loss += criterion(logits.float(), targets).item() * len(targets)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct += (top[:, 0] == targets).sum().item()
        correct_top5 += (top == targets[:, None]).any(dim=1).sum().item()
        seen += len(targets)
        if predictions is not None:
            predictions.extend(zip(targets.tolist(), top[:, 0].tolist()))
    total_loss, correct, correct_top5, seen = all_reduce_sum([total_loss, correct, correct_top5, seen], device)
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "top5_accuracy": correct_top5 / max(seen, 1),
    }


@torch.inference_mode()
def evaluate_multi_label(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
    num_classes: int,
    *,
    execution: Execution | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Loss, label accuracy at probability 0.5 and mean average precision over every process's
    images; and those images' probabilities and 0/1 targets (every process gets them all)."""
    total_loss, correct, seen = 0.0, 0.0, 0
    outputs: list[torch.Tensor] = []
    for logits, targets in _logits(model, loader, device, execution or Execution()):
        total_loss += criterion(logits.float(), targets).item() * len(targets)
        correct += right_answers(logits, targets)
        seen += len(targets)
        # In float64, as the server computes them: a threshold tuned on these is compared with those.
        outputs.append(torch.cat([torch.sigmoid(logits.double()), targets.double()], dim=1))
    total_loss, correct, seen = all_reduce_sum([total_loss, correct, seen], device)
    local = torch.cat(outputs) if outputs else torch.zeros((0, 2 * num_classes), dtype=torch.float64, device=device)
    gathered = all_gather_rows(local, device).numpy()
    scores, targets_all = gathered[:, :num_classes], gathered[:, num_classes:]
    metrics = {
        "loss": total_loss / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "mAP": multilabel.mean_average_precision(scores, targets_all),
    }
    return metrics, scores, targets_all
