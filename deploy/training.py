"""Training jobs and hyperparameter tuning jobs for the image (SDK v2 ``Estimator``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from sagemaker.estimator import Estimator
from sagemaker.inputs import TrainingInput
from sagemaker.session import Session
from sagemaker.tuner import CategoricalParameter, ContinuousParameter, HyperparameterTuner

from deploy.sdk import is_local

# The training log prints one ``metric: <name>=<value>`` line per metric (README, "Metrics").
# The names follow SageMaker's built-in algorithms (``validation:accuracy``); the tuner's
# objective must be one of these names.
METRIC_DEFINITIONS: tuple[Mapping[str, str], ...] = (
    {"Name": "validation:accuracy", "Regex": r"metric: validation_accuracy=([0-9.]+)"},
    {"Name": "validation:loss", "Regex": r"metric: validation_loss=([0-9.]+)"},
    {"Name": "train:loss", "Regex": r"metric: train_loss=([0-9.]+)"},
    {"Name": "train:images_per_second", "Regex": r"metric: train_images_per_second=([0-9.]+)"},
    {"Name": "test:accuracy", "Regex": r"metric: test_accuracy=([0-9.]+)"},
)
OBJECTIVE_METRIC = "validation:accuracy"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"  # where the image looks for checkpoints


@dataclass(frozen=True)
class JobSpec:
    """What a training job (alone or inside a tuning job) runs on and with."""

    image_uri: str
    role: str
    instance_type: str
    instance_count: int = 1
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    output_path: str | None = None  # None: the session's default bucket
    max_run_s: int = 24 * 3600
    spot: bool = False
    max_wait_s: int | None = None  # spot only; None: twice max_run_s
    checkpoint_s3_uri: str | None = None
    volume_size_gb: int = 30
    input_mode: str = "File"
    base_job_name: str = "image-classifier"


@dataclass(frozen=True)
class Channels:
    """Data locations (``s3://`` prefixes, or ``file://`` folders in local mode)."""

    training: str
    validation: str | None = None
    test: str | None = None

    def inputs(self, input_mode: str = "File") -> dict[str, TrainingInput]:
        named = {"training": self.training, "validation": self.validation, "test": self.test}
        return {name: TrainingInput(uri, input_mode=input_mode)
                for name, uri in named.items() if uri is not None}


@dataclass(frozen=True)
class TrainingResult:
    job_name: str
    model_data: str
    status: str


def metric_definitions() -> list[dict[str, str]]:
    return [dict(definition) for definition in METRIC_DEFINITIONS]


def build_estimator(spec: JobSpec, session: Session) -> Estimator:
    if spec.spot and not spec.checkpoint_s3_uri:
        # Without it an interrupted job starts again from epoch 0 and may never finish.
        raise ValueError("managed spot training needs a checkpoint S3 URI")
    spot = {}
    if spec.spot:
        max_wait = spec.max_wait_s if spec.max_wait_s is not None else 2 * spec.max_run_s
        if max_wait < spec.max_run_s:
            raise ValueError(f"max wait ({max_wait} s) must be at least max run ({spec.max_run_s} s)")
        spot = {"use_spot_instances": True, "max_wait": max_wait}
    checkpoints = {}
    if spec.checkpoint_s3_uri:
        checkpoints = {"checkpoint_s3_uri": spec.checkpoint_s3_uri, "checkpoint_local_path": CHECKPOINT_LOCAL_PATH}
    return Estimator(
        image_uri=spec.image_uri,
        role=spec.role,
        instance_count=spec.instance_count,
        instance_type=spec.instance_type,
        volume_size=spec.volume_size_gb,
        max_run=spec.max_run_s,
        input_mode=spec.input_mode,
        output_path=spec.output_path,
        base_job_name=spec.base_job_name,
        # SageMaker hands every hyperparameter to the container as a string anyway.
        hyperparameters={key: str(value) for key, value in spec.hyperparameters.items()},
        metric_definitions=metric_definitions(),
        sagemaker_session=session,
        **spot,
        **checkpoints,
    )


def train(spec: JobSpec, channels: Channels, session: Session, *, wait: bool = True,
          job_name: str | None = None) -> TrainingResult:
    """Start a training job; with ``wait``, stream its log until it ends (local mode always waits)."""
    estimator = build_estimator(spec, session)
    estimator.fit(channels.inputs(spec.input_mode), wait=wait, logs="All" if wait else "None", job_name=job_name)
    name = estimator.latest_training_job.name
    description = session.sagemaker_client.describe_training_job(TrainingJobName=name)
    status = description["TrainingJobStatus"]
    if status == "Completed" or is_local(session):
        model_data = description["ModelArtifacts"]["S3ModelArtifacts"]
    else:  # SageMaker only reports the artifact once the job is done; this is where it will be
        model_data = f"{estimator.output_path.rstrip('/')}/{name}/output/model.tar.gz"
    return TrainingResult(name, model_data, status)


@dataclass(frozen=True)
class TuningSpec:
    """Search space and budget: learning rate on a log scale, batch size from a list."""

    learning_rate: tuple[float, float] = (1e-4, 1e-1)
    batch_sizes: Sequence[int] = (16, 32, 64)
    max_jobs: int = 8
    max_parallel_jobs: int = 2
    strategy: str = "Bayesian"
    early_stopping: str = "Off"


def build_tuner(spec: JobSpec, tuning: TuningSpec, session: Session) -> HyperparameterTuner:
    low, high = tuning.learning_rate
    if not 0 < low < high:
        raise ValueError(f"learning rate range must satisfy 0 < low < high, got {low}..{high}")
    return HyperparameterTuner(
        estimator=build_estimator(spec, session),
        objective_metric_name=OBJECTIVE_METRIC,
        objective_type="Maximize",
        metric_definitions=metric_definitions(),
        hyperparameter_ranges={
            "learning_rate": ContinuousParameter(low, high, scaling_type="Logarithmic"),
            "batch_size": CategoricalParameter([str(size) for size in tuning.batch_sizes]),
        },
        max_jobs=tuning.max_jobs,
        max_parallel_jobs=tuning.max_parallel_jobs,
        strategy=tuning.strategy,
        early_stopping_type=tuning.early_stopping,
        base_tuning_job_name=spec.base_job_name,  # the SDK shortens it to fit 32 characters
    )


def tune(spec: JobSpec, tuning: TuningSpec, channels: Channels, session: Session, *, wait: bool = True,
         job_name: str | None = None) -> str:
    """Start a tuning job; returns its name (with ``wait``, once it has ended)."""
    tuner = build_tuner(spec, tuning, session)
    with _without_untrained_estimator_warning():
        tuner.fit(channels.inputs(spec.input_mode), job_name=job_name, wait=wait)
    return tuner.latest_tuning_job.name


@contextlib.contextmanager
def _without_untrained_estimator_warning() -> Iterator[None]:
    # HyperparameterTuner.fit reads estimator.model_data, which logs "No finished training job
    # found associated with this estimator ..." for an estimator that has not trained: always the
    # case when tuning, and only confusing to see.
    def keep(record: logging.LogRecord) -> bool:
        return "No finished training job found" not in record.getMessage()

    log = logging.getLogger("sagemaker.estimator")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)
