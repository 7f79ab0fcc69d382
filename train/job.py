"""A whole training run in one process of a (possibly) data-parallel job.

Reads top to bottom: data, model, optimizer, resume from the newest checkpoint, the epoch loop
(checkpointing at epoch ends, every ``checkpoint_steps`` and on SIGTERM), then the artifact and
the reports, written by rank 0 only.

Every metric is printed to stdout as one line, ``metric: <name>=<value> epoch=<n>``, so that
SageMaker metric definitions (``metric: validation_accuracy=([0-9.]+)``) can pick them up.
"""

from __future__ import annotations

import copy
import enum
import errno
import json
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from classifier.models import EFFICIENTNET_LITE0, classification_head, create_model, replace_head
from classifier.pretrained import IMAGENET_LITE0_PREPROCESSING, efficientnet_lite0_imagenet
from train import checkpoint
from train.data import ShardSampler, eval_loader, load_splits, train_loader
from train.distributed import (
    Topology,
    all_gather_pairs,
    any_process,
    from_main_process,
    init_process_group,
    is_main_process,
)
from train.engine import Precision, evaluate, train_one_epoch
from train.report import write_reports
from train.s3_checkpoints import CheckpointSyncError, S3Checkpoints, watch_for_spot_notice
from train.settings import Hyperparameters, Paths, Settings, SettingsError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class Outcome(enum.Enum):
    COMPLETED = "completed"
    STOPPED = "stopped"  # SIGTERM: checkpoint written, run again to resume


def emit_metric(name: str, value: float, epoch: int | None = None) -> None:
    if is_main_process():
        suffix = f" epoch={epoch}" if epoch is not None else ""
        print(f"metric: {name}={value:.6f}{suffix}", flush=True)


def select_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"hyperparameter device={name!r} but no CUDA device is visible")
    return device


def preprocessing_for(hp: Hyperparameters) -> Preprocessing:
    """Input scaling matches the pretrained weights; sizes follow image_size (crop = 87.5%)."""
    lite0 = hp.architecture == EFFICIENTNET_LITE0
    prep = IMAGENET_LITE0_PREPROCESSING
    return Preprocessing(
        crop_size=hp.image_size,
        resize_size=math.ceil(hp.image_size / 0.875),
        mean=prep.mean if lite0 else IMAGENET_MEAN,
        std=prep.std if lite0 else IMAGENET_STD,
        interpolation=prep.interpolation if lite0 else "bilinear",
    )


def weights_source(hp: Hyperparameters, paths: Paths) -> Path | None:
    """A user-supplied state dict: the weights_file hyperparameter, else the `pretrained` channel."""
    if hp.weights_file:
        path = Path(hp.weights_file)
        if not path.is_absolute() and paths.pretrained_dir is not None:
            path = paths.pretrained_dir / path
        if not path.is_file():
            raise SettingsError(f"hyperparameter weights_file={hp.weights_file!r}: no such file")
        return path
    if paths.pretrained_dir is not None:
        files = sorted(p for p in paths.pretrained_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise SettingsError(f"the pretrained channel {paths.pretrained_dir} holds no weights file "
                                f"({', '.join(WEIGHT_SUFFIXES)})")
        return files[0]
    return None


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict, leaving out the head when its shape differs (other class count)."""
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    head_ids = {id(p) for p in classification_head(model).parameters()}
    head = {name for name, p in model.named_parameters() if id(p) in head_ids}
    missing = [k for k in own if k not in fitting and k not in head]
    if missing:
        raise SettingsError(f"weights in {path} do not fit the model: {len(missing)} tensors missing "
                            f"or of another shape, e.g. {missing[:3]}")
    model.load_state_dict(fitting, strict=False)
    logger.info("initialised from %s (%d of %d tensors)", path, len(fitting), len(own))


def build_model(hp: Hyperparameters, paths: Paths, num_classes: int) -> nn.Module:
    source = weights_source(hp, paths)
    if source is not None:
        model = create_model(hp.architecture, num_classes)
        load_backbone_weights(model, source)
    elif not hp.pretrained:
        model = create_model(hp.architecture, num_classes)
    elif hp.architecture == EFFICIENTNET_LITE0:
        model = efficientnet_lite0_imagenet()
        replace_head(model, num_classes)
    else:
        raise SettingsError(
            f"no pretrained weights are shipped for architecture={hp.architecture!r}; "
            f"use architecture={EFFICIENTNET_LITE0!r}, supply weights (weights_file or a "
            "`pretrained` channel) or set pretrained=false"
        )
    if hp.freeze_backbone:
        head = set(classification_head(model).parameters())
        for parameter in model.parameters():
            parameter.requires_grad = parameter in head
    return model


def make_optimizer(hp: Hyperparameters, model: nn.Module) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    return torch.optim.SGD(parameters, lr=hp.learning_rate, momentum=hp.momentum, weight_decay=hp.weight_decay)


def make_scheduler(hp: Hyperparameters, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warm-up, then cosine, step or constant."""
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    total = hp.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if hp.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if hp.lr_schedule == "step":
            return hp.lr_gamma ** (step // (hp.lr_step_size * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Observers:
    """Optional TensorBoard scalars and torch.profiler trace, both under <output>/tensorboard."""

    def __init__(self, hp: Hyperparameters, paths: Paths, rank: int, stack: ExitStack) -> None:
        self.writer = None
        self.profiler = None
        if rank != 0:
            return
        if hp.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = stack.enter_context(SummaryWriter(str(paths.tensorboard_dir)))
        if hp.profile_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = stack.enter_context(torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=1, warmup=1, active=hp.profile_steps, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(paths.tensorboard_dir / "profile")),
            ))

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def epoch(self, record: dict[str, Any], learning_rate: float) -> None:
        if self.writer is None:
            return
        for split in ("train", "validation"):
            for name, value in record.get(split, {}).items():
                self.writer.add_scalar(f"{split}/{name}", value, record["epoch"])
        self.writer.add_scalar("train/learning_rate", learning_rate, record["epoch"])
        self.writer.flush()


@contextmanager
def sigterm_requests_stop() -> Iterator[threading.Event]:
    """SIGTERM (job stopped, spot interruption) sets the event instead of killing the process."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision,
             class_names: tuple[str, ...], architecture: str) -> None:
    made_for = (state["architecture"], tuple(state["class_names"]))
    if made_for != (architecture, class_names):
        raise SettingsError(
            f"the checkpoint folder holds a checkpoint of another run ({made_for[0]} with "
            f"{len(made_for[1])} classes); remove it or choose another checkpoint folder"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if precision.scaler is not None and state.get("scaler"):
        precision.scaler.load_state_dict(state["scaler"])
    checkpoint.restore_rng_state(state["rng"])


def _share_checkpoint(state: dict[str, Any] | None, rank: int, device: torch.device) -> dict[str, Any] | None:
    """Rank 0's checkpoint on every process (checkpoints live on rank 0's host). It travels as the
    bytes of its file and is read back with ``weights_only=True``: no pickles between ranks."""
    if not dist.is_initialized():
        return state
    data = checkpoint.to_bytes(state) if rank == 0 and state is not None else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if size.item() == 0:
        return None
    if rank == 0:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=0)
    return state if rank == 0 else checkpoint.from_bytes(payload.cpu().numpy().tobytes())


def save_on_main(directory: Path, make_state: Callable[[], dict[str, Any]], global_step: int, rank: int,
                 device: torch.device, *, stopping: bool) -> None:
    """Rank 0 writes the checkpoint and every process learns whether that worked, so that a failed
    write (a full disk) stops all of them with one reason, rather than leaving the others waiting
    for rank 0 at the next collective, or exiting as if the checkpoint had been written."""
    code, failure = 0, None
    if rank == 0:
        try:
            checkpoint.save(directory, make_state(), global_step)
        except Exception as exc:
            logger.exception("could not write checkpoint %d to %s", global_step, directory)
            cause = checkpoint.os_error_behind(exc)
            code, failure = (cause.errno if cause is not None and cause.errno else -1), exc
    code = from_main_process(code, device)
    if code:
        when = " on SIGTERM" if stopping else ""
        if code > 0:
            reason = f"{os.strerror(code)} (errno {code})"
        else:
            reason = f"{type(failure).__name__}: {failure}" if failure else "see the log of rank 0"
        advice = "; free space there or give the job a larger volume" if code == errno.ENOSPC else ""
        raise checkpoint.CheckpointError(
            f"the checkpoint of step {global_step}{when} could not be written to {directory}: {reason}{advice}. "
            "Started again, the job resumes from the newest complete checkpoint, if any"
        ) from failure


def run(settings: Settings, topology: Topology | None = None, local_rank: int = 0) -> Outcome:
    """Train; write the artifact (best validation accuracy, else last epoch) and the reports."""
    hp = settings.hyperparameters
    topology = topology or Topology(("localhost",), "localhost", 1, "localhost", 0, None)
    device = select_device(hp.device, local_rank)
    if topology.distributed:
        init_process_group(topology, local_rank, use_cuda=device.type == "cuda", timeout_s=hp.peer_timeout_s)
    try:
        with sigterm_requests_stop() as stop, ExitStack() as stack:
            if settings.spot:
                done = threading.Event()
                stack.callback(done.set)
                watch_for_spot_notice(stop, settings.metadata_endpoint, settings.spot_poll_s, done)
            rank = topology.rank(local_rank)
            observers = Observers(hp, settings.paths, rank, stack)
            return _train(settings, rank, topology.world_size, device, stop, observers)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(settings: Settings, rank: int, world_size: int, device: torch.device, stop: threading.Event,
           observers: Observers) -> Outcome:
    hp, paths = settings.hyperparameters, settings.paths
    seed_everything(hp.seed)
    preprocessing = preprocessing_for(hp)
    splits = load_splits(paths, hp, preprocessing)
    logger.info(
        "data: %d classes, %d training / %s validation / %s test images, %d skipped; "
        "rank %d of %d on %s",
        len(splits.class_names), len(splits.train),
        len(splits.validation) if splits.validation else "no",
        len(splits.test) if splits.test else "no", len(splits.skipped_files), rank, world_size, device,
    )
    pin = device.type == "cuda"
    sampler = ShardSampler(len(splits.train), rank=rank, world_size=world_size, shuffle=True, seed=hp.seed)
    loader = train_loader(splits.train, sampler, hp, pin_memory=pin)
    steps_per_epoch = len(loader)

    model = build_model(hp, paths, len(splits.class_names)).to(device)
    precision = Precision(
        amp=hp.amp and device.type == "cuda",
        channels_last=hp.channels_last,
        scaler=torch.amp.GradScaler("cuda") if hp.amp and device.type == "cuda" else None,
    )
    if hp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(hp, model)
    scheduler = make_scheduler(hp, optimizer, steps_per_epoch)
    trained = DistributedDataParallel(model, device_ids=[device.index] if pin else None) if world_size > 1 else model
    criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    validation_loader = (eval_loader(splits.validation, hp, rank=rank, world_size=world_size, pin_memory=pin)
                         if splits.validation else None)

    progress: dict[str, Any] = {"epoch": 1, "step_in_epoch": 0, "global_step": 0, "history": [],
                                "best_accuracy": -1.0, "best_epoch": 0, "best_state": None, "stale_epochs": 0}
    # Rank 0 holds the checkpoints; outside SageMaker it also mirrors them at an S3 prefix.
    mirror = None
    if paths.checkpoint_s3_uri and rank == 0:
        mirror = S3Checkpoints(paths.checkpoint_s3_uri, paths.checkpoint_dir)
        mirror.restore()
    state = _share_checkpoint(checkpoint.load_latest(paths.checkpoint_dir) if rank == 0 else None, rank, device)
    if state is not None:
        _restore(state, model, optimizer, scheduler, precision, splits.class_names, hp.architecture)
        progress.update({k: state[k] for k in progress})
        if progress["step_in_epoch"] >= steps_per_epoch:  # saved at an epoch's end
            progress["epoch"], progress["step_in_epoch"] = progress["epoch"] + 1, 0

    def save_checkpoint(*, stopping: bool = False) -> None:
        save_on_main(paths.checkpoint_dir, lambda: {
            **progress, "architecture": hp.architecture, "class_names": list(splits.class_names),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(),
            "scaler": precision.scaler.state_dict() if precision.scaler else None,
            "settings": settings.to_dict(),
        }, progress["global_step"], rank, device, stopping=stopping)
        if mirror is not None and not stopping:
            mirror.sync_in_background()

    def stopped() -> Outcome:
        failure = None
        if mirror is not None:
            try:
                mirror.flush()  # the instance may be gone in two minutes: the newest checkpoint in S3 first
            except CheckpointSyncError as exc:
                failure = exc
        if dist.is_initialized():
            # The other processes wait for that upload: a launcher stops every process once one exits.
            dist.barrier()
        if failure is not None:
            raise failure
        return Outcome.STOPPED

    def after_step(step: int) -> bool:
        progress["step_in_epoch"], progress["global_step"] = step, progress["global_step"] + 1
        observers.step()
        if step == steps_per_epoch:
            # The epoch's end checkpoints (with the epoch's record) and stops if asked to: a
            # checkpoint here would hold a finished epoch without its evaluation, which resuming
            # would skip.
            return False
        stopping = any_process(stop.is_set(), device)
        if stopping or (hp.checkpoint_steps and progress["global_step"] % hp.checkpoint_steps == 0):
            save_checkpoint(stopping=stopping)
        return stopping

    while progress["epoch"] <= hp.epochs:
        epoch = progress["epoch"]
        sampler.set_epoch(epoch, start=progress["step_in_epoch"] * hp.batch_size)
        train_metrics = train_one_epoch(trained, loader, criterion, optimizer, scheduler, device, epoch,
                                        precision=precision, start_step=progress["step_in_epoch"],
                                        after_step=after_step)
        if not train_metrics.pop("completed"):
            logger.info("stopped by SIGTERM in epoch %d; run again to resume", epoch)
            return stopped()
        record: dict[str, Any] = {"epoch": epoch, "train": train_metrics}
        if validation_loader is not None:
            record["validation"] = evaluate(model, validation_loader, eval_criterion, device, precision=precision)
        for split in ("train", "validation"):
            for name, value in record.get(split, {}).items():
                emit_metric(f"{split}_{name}", value, epoch)
        progress["history"].append(record)
        observers.epoch(record, scheduler.get_last_lr()[0])

        accuracy = record.get("validation", record["train"])["accuracy"]
        if validation_loader is None or accuracy > progress["best_accuracy"]:
            progress.update(best_accuracy=accuracy, best_epoch=epoch, stale_epochs=0,
                            best_state=copy.deepcopy(model.state_dict()))
        else:
            progress["stale_epochs"] += 1
        progress["step_in_epoch"] = steps_per_epoch
        save_checkpoint()
        progress["epoch"], progress["step_in_epoch"] = epoch + 1, 0
        if any_process(stop.is_set(), device):
            logger.info("stopped by SIGTERM after epoch %d; run again to resume", epoch)
            return stopped()
        if hp.early_stopping_patience and progress["stale_epochs"] >= hp.early_stopping_patience:
            logger.info("early stopping: no validation improvement for %d epochs", progress["stale_epochs"])
            break

    model.load_state_dict(progress["best_state"])
    _finish(settings, model, splits, progress, preprocessing, device, precision, rank, world_size)
    if mirror is not None:
        try:
            mirror.flush()
        except CheckpointSyncError as exc:  # the artifact is written: the run did what it was for
            logger.warning("checkpoints: %s", exc)
    if dist.is_initialized():
        # Every host ends together, once rank 0 has written the artifact: launchers that stop
        # the whole job when one container exits (SDK local mode) cannot cut rank 0 short.
        dist.barrier()
    return Outcome.COMPLETED


def _finish(settings: Settings, model: nn.Module, splits: Any, progress: dict[str, Any],
            preprocessing: Preprocessing, device: torch.device, precision: Precision,
            rank: int, world_size: int) -> None:
    hp, paths = settings.hyperparameters, settings.paths
    metrics: dict[str, Any] = {"best_epoch": progress["best_epoch"], "epochs_run": len(progress["history"])}
    best = next((record for record in progress["history"] if record["epoch"] == progress["best_epoch"]), {})
    if "validation" in best:
        metrics["validation"] = best["validation"]
    pairs: list[tuple[int, int]] = []
    if splits.test is not None:
        test_loader = eval_loader(splits.test, hp, rank=rank, world_size=world_size, pin_memory=device.type == "cuda")
        metrics["test"] = evaluate(model, test_loader, nn.CrossEntropyLoss(), device,
                                   precision=precision, predictions=pairs)
        for name, value in metrics["test"].items():
            emit_metric(f"test_{name}", value)
        pairs = all_gather_pairs(pairs, device)
    if rank != 0:
        return
    manifest = Manifest(
        architecture=hp.architecture,
        class_names=splits.class_names,
        preprocessing=preprocessing,
        training=settings.to_dict(),
        metrics=metrics,
    )
    artifact.save(paths.model_dir, model, manifest)
    paths.output_data_dir.mkdir(parents=True, exist_ok=True)
    report = write_reports(
        paths.output_data_dir,
        class_names=splits.class_names,
        history=progress["history"],
        test_targets=[t for t, _ in pairs] if pairs else None,
        test_predictions=[p for _, p in pairs] if pairs else None,
        skipped_files=splits.skipped_files,
    )
    metrics["report"] = report
    (paths.output_data_dir / "metrics.json").write_text(
        json.dumps({**metrics, "history": progress["history"]}, indent=2) + "\n"
    )
    logger.info("artifact written to %s (best epoch %d)", paths.model_dir, progress["best_epoch"])
