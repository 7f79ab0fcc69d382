"""A whole training run in one process of a (possibly) data-parallel job.

:func:`train` reads top to bottom: data, model, optimizer, resume from the newest checkpoint, the
epoch loop (checkpointing at epoch ends, every ``checkpoint_steps`` and on SIGTERM), then the
artifact and the reports, written by rank 0 only. The loop's state is one
:class:`~train.checkpoint.Progress`; :mod:`train.checkpoint` saves and restores it with the
tensors, :mod:`train.model` builds the network, :mod:`train.engine` runs an epoch.

Every metric is printed to stdout as one line, ``metric: <name>=<value> epoch=<n>``, so that
SageMaker metric definitions (``metric: validation_accuracy=([0-9.]+)``) can pick them up.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from classifier import artifact
from classifier.artifact import MULTICLASS, MULTILABEL, Manifest, Preprocessing
from classifier.export import GRAPH_FILE, write_graph
from train import checkpoint, multilabel
from train.checkpoint import Progress, Trainee
from train.data import ShardSampler, Splits, eval_loader, load_splits, train_loader
from train.distributed import Topology, all_gather_pairs, any_process, init_process_group, is_main_process
from train.engine import Execution, evaluate, evaluate_multi_label, train_one_epoch
from train.errors import CheckpointSyncError, DivergedError, SettingsError
from train.model import build_model, make_optimizer, make_scheduler, preprocessing_for
from train.report import write_reports
from train.s3_checkpoints import S3Checkpoints, watch_for_spot_notice
from train.settings import Hyperparameters, Paths, Settings

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    COMPLETED = "completed"
    STOPPED = "stopped"  # SIGTERM: checkpoint written, run again to resume


def emit_metric(name: str, value: float, epoch: int | None = None) -> None:
    if is_main_process():
        suffix = f" epoch={epoch}" if epoch is not None else ""
        print(f"metric: {name}={value:.6f}{suffix}", flush=True)


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """The process's device: with ``cuda`` (or ``auto`` on a GPU host) and no index, the GPU of its
    local rank, so the processes of a host never share GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"hyperparameter device={name!r} but no CUDA device is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


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


def run(settings: Settings, topology: Topology | None = None, local_rank: int = 0) -> Outcome:
    """Join the job's processes, if several, and train with SIGTERM (and the spot notice) asking
    for a checkpoint and a clean stop."""
    hp = settings.hyperparameters
    topology = topology or Topology(("localhost",), "localhost", 1, "localhost", 0, None)
    device = select_device(hp.device, local_rank)
    if device.type == "cuda":
        # The current device too: NCCL's barrier and every tensor made without a device use it.
        torch.cuda.set_device(device)
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
            return train(settings, rank, topology.world_size, device, stop, observers)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(settings: Settings, rank: int, world_size: int, device: torch.device, stop: threading.Event,
          observers: Observers) -> Outcome:
    """Train; write the artifact (best validation accuracy or, multi-label, mAP; else the last
    epoch) and the reports."""
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
    validation_loader = (eval_loader(splits.validation, hp, rank=rank, world_size=world_size, pin_memory=pin)
                         if splits.validation else None)

    mixed = hp.amp and device.type == "cuda"
    execution = Execution(amp=mixed, channels_last=hp.channels_last,
                          scaler=torch.amp.GradScaler("cuda") if mixed else None)
    model = build_model(hp, paths, len(splits.class_names)).to(device)
    if hp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(hp, model)
    scheduler = make_scheduler(hp, optimizer, steps_per_epoch)
    trained = DistributedDataParallel(model, device_ids=[device.index] if pin else None) if world_size > 1 else model
    if splits.multi_label:
        criterion: nn.Module = nn.BCEWithLogitsLoss()
        score_name = "mAP"  # what chooses the best epoch
    else:
        criterion, score_name = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing), "accuracy"
    trainee = Trainee(model, optimizer, scheduler, execution.scaler, hp.architecture, splits.class_names, hp.task)

    # Rank 0 holds the checkpoints; outside SageMaker it also mirrors them at an S3 prefix.
    mirror = S3Checkpoints(paths.checkpoint_s3_uri, paths.checkpoint_dir) if paths.checkpoint_s3_uri and rank == 0 else None
    if mirror is not None:
        mirror.restore()
    state = checkpoint.load_on_every_process(paths.checkpoint_dir, rank, device)
    progress = checkpoint.restore(state, trainee) if state is not None else Progress()
    if progress.step_in_epoch >= steps_per_epoch:  # saved at an epoch's end
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0

    def save_checkpoint(*, stopping: bool = False) -> None:
        checkpoint.save_on_main(paths.checkpoint_dir, lambda: checkpoint.capture(progress, trainee, settings.to_dict()),
                                progress.global_step, rank, device, stopping=stopping)
        if mirror is not None and not stopping:
            mirror.sync_in_background()

    def after_step(step: int) -> bool:
        """Count the step; checkpoint when it is time or when asked to stop. True: stop now."""
        progress.step_in_epoch, progress.global_step = step, progress.global_step + 1
        observers.step()
        if step == steps_per_epoch:
            # The epoch's end checkpoints (with the epoch's record) and stops if asked to: a
            # checkpoint here would hold a finished epoch without its evaluation, which resuming
            # would skip.
            return False
        stopping = any_process(stop.is_set(), device)
        if stopping or (hp.checkpoint_steps and progress.global_step % hp.checkpoint_steps == 0):
            save_checkpoint(stopping=stopping)
        return stopping

    while progress.epoch <= hp.epochs:
        epoch = progress.epoch
        sampler.set_epoch(epoch, start=progress.step_in_epoch * hp.batch_size)
        train_metrics = train_one_epoch(trained, loader, criterion, optimizer, scheduler, device, epoch,
                                        execution=execution, start_step=progress.step_in_epoch,
                                        after_step=after_step)
        if not train_metrics.pop("completed"):
            logger.info("stopped by SIGTERM in epoch %d; run again to resume", epoch)
            return stop_with_checkpoints_saved(mirror)
        record: dict[str, Any] = {"epoch": epoch, "train": train_metrics}
        if validation_loader is not None and splits.multi_label:
            record["validation"], _, _ = evaluate_multi_label(model, validation_loader, criterion, device,
                                                              len(splits.class_names), execution=execution)
        elif validation_loader is not None:
            record["validation"] = evaluate(model, validation_loader, nn.CrossEntropyLoss(), device,
                                            execution=execution)
        for split in ("train", "validation"):
            for name, value in record.get(split, {}).items():
                emit_metric(f"{split}_{name}", value, epoch)
        progress.history.append(record)
        observers.epoch(record, scheduler.get_last_lr()[0])

        score = record.get("validation", record["train"]).get(score_name, -1.0)
        if validation_loader is None or score > progress.best_score:
            progress.best_score, progress.best_epoch, progress.stale_epochs = score, epoch, 0
            progress.best_weights = copy.deepcopy(model.state_dict())
        else:
            progress.stale_epochs += 1
        progress.step_in_epoch = steps_per_epoch
        save_checkpoint()
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        if any_process(stop.is_set(), device):
            logger.info("stopped by SIGTERM after epoch %d; run again to resume", epoch)
            return stop_with_checkpoints_saved(mirror)
        if hp.early_stopping_patience and progress.stale_epochs >= hp.early_stopping_patience:
            logger.info("early stopping: no validation improvement for %d epochs", progress.stale_epochs)
            break

    if progress.best_weights is None:
        raise RuntimeError("no epoch has finished, so there are no weights to write")
    model.load_state_dict(progress.best_weights)
    write_artifact(settings, model, splits, progress, preprocessing, device, execution, rank, world_size)
    if mirror is not None:
        try:
            mirror.flush()
        except CheckpointSyncError as exc:  # the artifact is written: the run did what it was for
            logger.warning("%s", exc)
    if dist.is_initialized():
        # Every host ends together, once rank 0 has written the artifact: launchers that stop
        # the whole job when one container exits (SDK local mode) cannot cut rank 0 short.
        dist.barrier()
    return Outcome.COMPLETED


def stop_with_checkpoints_saved(mirror: S3Checkpoints | None) -> Outcome:
    """End a stopped run once its newest checkpoint is safe: the instance may be gone in two minutes."""
    failure = None
    if mirror is not None:
        try:
            mirror.flush()  # the newest checkpoint in S3 first
        except CheckpointSyncError as exc:
            failure = exc
    if dist.is_initialized():
        # The other processes wait for that upload: a launcher stops every process once one exits.
        dist.barrier()
    if failure is not None:
        raise failure
    return Outcome.STOPPED


def write_artifact(settings: Settings, model: nn.Module, splits: Splits, progress: Progress,
                   preprocessing: Preprocessing, device: torch.device, execution: Execution,
                   rank: int, world_size: int) -> None:
    """Evaluate the chosen weights on the test split (every process), then, on rank 0, write the
    artifact, the reports and metrics.json."""
    hp, paths = settings.hyperparameters, settings.paths
    metrics: dict[str, Any] = {"best_epoch": progress.best_epoch, "epochs_run": len(progress.history)}
    best = next((record for record in progress.history if record["epoch"] == progress.best_epoch), {})
    if "validation" in best:
        metrics["validation"] = best["validation"]
    thresholds: tuple[float, ...] = ()
    if splits.multi_label:
        thresholds = _tune_and_test_multi_label(settings, model, splits, metrics, device, execution, rank, world_size)
    pairs: list[tuple[int, int]] = []
    if splits.test is not None and not splits.multi_label:
        test_loader = eval_loader(splits.test, hp, rank=rank, world_size=world_size, pin_memory=device.type == "cuda")
        metrics["test"] = evaluate(model, test_loader, nn.CrossEntropyLoss(), device,
                                   execution=execution, predictions=pairs)
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
        task=MULTILABEL if splits.multi_label else MULTICLASS,
        thresholds=thresholds,
        format_version=artifact.MULTILABEL_FORMAT_VERSION if splits.multi_label else artifact.FORMAT_VERSION,
    )
    artifact.save(paths.model_dir, model, manifest)
    if hp.export_graph:
        write_graph(paths.model_dir)
    else:
        (paths.model_dir / GRAPH_FILE).unlink(missing_ok=True)  # an earlier run's, for other weights
    paths.output_data_dir.mkdir(parents=True, exist_ok=True)
    report = write_reports(
        paths.output_data_dir,
        class_names=splits.class_names,
        history=progress.history,
        test_targets=[t for t, _ in pairs] if pairs else None,
        test_predictions=[p for _, p in pairs] if pairs else None,
        skipped_files=splits.skipped_files,
    )
    metrics["report"] = report
    (paths.output_data_dir / "metrics.json").write_text(
        json.dumps({**metrics, "history": progress.history}, indent=2) + "\n"
    )
    logger.info("artifact written to %s (best epoch %d)", paths.model_dir, progress.best_epoch)


def _multi_label_outputs(model: nn.Module, dataset: Any, split: str, settings: Settings, num_classes: int,
                         device: torch.device, execution: Execution, rank: int,
                         world_size: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """The split's metrics, and every image's probabilities and targets."""
    loader = eval_loader(dataset, settings.hyperparameters, rank=rank, world_size=world_size,
                         pin_memory=device.type == "cuda")
    metrics, scores, targets = evaluate_multi_label(model, loader, nn.BCEWithLogitsLoss(), device, num_classes,
                                                    execution=execution)
    if not np.isfinite(scores).all():
        raise DivergedError(f"the model's {split} probabilities are not all finite numbers: training diverged "
                            "(a lower learning_rate may help)")
    return metrics, scores, targets


def _tune_and_test_multi_label(settings: Settings, model: nn.Module, splits: Splits, metrics: dict[str, Any],
                               device: torch.device, execution: Execution, rank: int,
                               world_size: int) -> tuple[float, ...]:
    """Per-class thresholds with the best F1 on validation (0.5 without it); the test split's
    metrics, and a per-class table of the test split (else validation), into ``metrics``."""
    place = (len(splits.class_names), device, execution, rank, world_size)
    thresholds = np.full(len(splits.class_names), multilabel.DEFAULT_THRESHOLD)
    judged = None
    if splits.validation is not None:
        _, scores, targets = _multi_label_outputs(model, splits.validation, "validation", settings, *place)
        thresholds = multilabel.best_thresholds(scores, targets)
        judged = ("validation", scores, targets)
    if splits.test is not None:
        metrics["test"], scores, targets = _multi_label_outputs(model, splits.test, "test", settings, *place)
        for name, value in metrics["test"].items():
            emit_metric(f"test_{name}", value)
        judged = ("test", scores, targets)
    if judged is not None:
        split, scores, targets = judged
        metrics["per_class"] = {"split": split,
                                "classes": multilabel.per_class(scores, targets, thresholds, splits.class_names)}
    return tuple(float(t) for t in thresholds)
