"""Training jobs and hyperparameter tuning jobs for the image, as SageMaker API requests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from deploy.session import SageMaker, timestamped

logger = logging.getLogger(__name__)
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
TERMINAL = ("Completed", "Failed", "Stopped")
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
POLL_S = 15.0
LOG_LOOKBACK_MS = 5 * 60 * 1000  # each look at the log reads this far back for lines that came late
TUNING_NAME_LIMIT = 32  # characters in a tuning job's name


@dataclass(frozen=True)
class Security:
    """Network and encryption settings shared by jobs, models and endpoints (all optional)."""

    subnets: Sequence[str] = ()
    security_group_ids: Sequence[str] = ()
    kms_key: str | None = None  # outputs and attached volumes
    network_isolation: bool = False
    encrypt_inter_container_traffic: bool = False
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.subnets) != bool(self.security_group_ids):
            raise ValueError("a VPC needs both subnets and security groups")

    def vpc_config(self) -> dict[str, Any]:
        return {"VpcConfig": {"Subnets": list(self.subnets), "SecurityGroupIds": list(self.security_group_ids)}} \
            if self.subnets else {}

    def tag_list(self) -> dict[str, Any]:
        return {"Tags": [{"Key": key, "Value": value} for key, value in self.tags.items()]} if self.tags else {}


@dataclass(frozen=True)
class JobSpec:
    """What a training job (alone or inside a tuning job) runs on and with."""

    image_uri: str
    role: str
    instance_type: str
    instance_count: int = 1
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    output_path: str | None = None  # None: SageMaker's default bucket
    max_run_s: int = 24 * 3600
    spot: bool = False
    max_wait_s: int | None = None  # spot only; None: twice max_run_s
    checkpoint_s3_uri: str | None = None
    volume_size_gb: int = 30
    input_mode: str = "File"
    base_job_name: str = "image-classifier"
    security: Security = field(default_factory=Security)


@dataclass(frozen=True)
class Channels:
    """Data locations (``s3://`` prefixes, or ``file://`` folders in local mode)."""

    training: str
    validation: str | None = None
    test: str | None = None

    def input_data_config(self) -> list[dict[str, Any]]:
        named = {"training": self.training, "validation": self.validation, "test": self.test}
        return [{"ChannelName": name, "DataSource": {"S3DataSource": {
                    "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}
                for name, uri in named.items() if uri is not None]


@dataclass(frozen=True)
class TrainingResult:
    job_name: str
    model_data: str
    status: str
    failure_reason: str | None = None


def metric_definitions() -> list[dict[str, str]]:
    return [dict(definition) for definition in METRIC_DEFINITIONS]


def job_definition(spec: JobSpec, channels: Channels, output_path: str) -> dict[str, Any]:
    """The parts of a training job that a tuning job's jobs share too."""
    if spec.spot and not spec.checkpoint_s3_uri:
        # Without it an interrupted job starts again from epoch 0 and may never finish.
        raise ValueError("managed spot training needs a checkpoint S3 URI")
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": spec.max_run_s}
    definition: dict[str, Any] = {
        "AlgorithmSpecification": {"TrainingImage": spec.image_uri, "TrainingInputMode": spec.input_mode,
                                   "MetricDefinitions": metric_definitions()},
        "RoleArn": spec.role,
        "InputDataConfig": channels.input_data_config(),
        "OutputDataConfig": {"S3OutputPath": output_path},
        "ResourceConfig": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count,
                           "VolumeSizeInGB": spec.volume_size_gb},
        "StoppingCondition": stopping,
    }
    if spec.spot:
        max_wait = spec.max_wait_s if spec.max_wait_s is not None else 2 * spec.max_run_s
        if max_wait < spec.max_run_s:
            raise ValueError(f"max wait ({max_wait} s) must be at least max run ({spec.max_run_s} s)")
        stopping["MaxWaitTimeInSeconds"] = max_wait
        definition["EnableManagedSpotTraining"] = True
    if spec.checkpoint_s3_uri:
        definition["CheckpointConfig"] = {"S3Uri": spec.checkpoint_s3_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    security = spec.security
    if security.kms_key:
        definition["OutputDataConfig"]["KmsKeyId"] = security.kms_key
        definition["ResourceConfig"]["VolumeKmsKeyId"] = security.kms_key
    definition.update(security.vpc_config())
    if security.network_isolation:
        definition["EnableNetworkIsolation"] = True
    if security.encrypt_inter_container_traffic:
        definition["EnableInterContainerTrafficEncryption"] = True
    return definition


def output_path(spec: JobSpec, sagemaker: SageMaker) -> str:
    return spec.output_path or f"s3://{sagemaker.default_bucket()}/"


def train(spec: JobSpec, channels: Channels, sagemaker: SageMaker, *, wait: bool = True,
          job_name: str | None = None, print_line: Callable[[str], None] = print) -> TrainingResult:
    """Start a training job; with ``wait``, print its log until it ends (local mode runs it to the
    end in this call, printing the containers' output as it goes)."""
    name = job_name or timestamped(spec.base_job_name)
    destination = output_path(spec, sagemaker)
    request = {"TrainingJobName": name, **job_definition(spec, channels, destination),
               # SageMaker hands every hyperparameter to the container as a string anyway.
               "HyperParameters": {key: str(value) for key, value in spec.hyperparameters.items()},
               **spec.security.tag_list()}
    sagemaker.sagemaker.create_training_job(**request)
    if wait and not sagemaker.local:
        follow_training_log(sagemaker, name, print_line)
    description = sagemaker.sagemaker.describe_training_job(TrainingJobName=name)
    status = description["TrainingJobStatus"]
    artifact = description.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if not artifact:  # SageMaker only reports the artifact once the job is done; this is where it will be
        artifact = f"{destination.rstrip('/')}/{name}/output/model.tar.gz"
    return TrainingResult(name, artifact, status, description.get("FailureReason"))


def follow_training_log(sagemaker: SageMaker, job_name: str, print_line: Callable[[str], None], *,
                        poll_s: float = POLL_S, sleep: Callable[[float], None] = time.sleep) -> str:
    """Print the job's CloudWatch log lines (every host's, prefixed by the host when there are
    several) as they come, until the job ends; the final status.

    Each look asks for the events of the last few minutes again (hosts' lines arrive out of
    order, and late) and prints those not printed yet, by event id. After the job ends it looks
    once more, a poll later, for the last lines (a failure's traceback among them). A log the
    caller may not read is skipped with one warning; other errors are retried at the next look."""
    logs = sagemaker.client("logs")
    seen: dict[str, int] = {}  # event id -> timestamp, for the look-back window
    streams: set[str] = set()
    newest = 0
    readable = True

    def read_new() -> None:
        nonlocal newest, readable
        start = max(0, newest - LOG_LOOKBACK_MS)
        arguments: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{job_name}/",
                                     "startTime": start}
        while True:
            try:
                page = logs.filter_log_events(**arguments)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in ("AccessDeniedException", "UnrecognizedClientException"):
                    logger.warning("cannot read the job's log (%s; it needs logs:FilterLogEvents): "
                                   "waiting for the job to end", code)
                    readable = False
                elif code != "ResourceNotFoundException":  # that one: no log yet, the instances are starting
                    logger.info("reading the job's log failed (%s); trying again", code)
                return
            for event in page.get("events", []):
                if event["eventId"] in seen:
                    continue
                seen[event["eventId"]] = event["timestamp"]
                newest = max(newest, event["timestamp"])
                stream = event.get("logStreamName", "")
                streams.add(stream)
                host = stream.removeprefix(f"{job_name}/").split("-")
                prefix = f"[{'-'.join(host[:2])}] " if len(streams) > 1 and len(host) >= 2 else ""
                print_line(prefix + event["message"])
            if not page.get("nextToken"):
                break
            arguments["nextToken"] = page["nextToken"]  # the same query's next page
        for event_id in [key for key, stamp in seen.items() if stamp < newest - LOG_LOOKBACK_MS]:
            del seen[event_id]

    while True:
        status = sagemaker.sagemaker.describe_training_job(TrainingJobName=job_name)["TrainingJobStatus"]
        if readable:
            read_new()
        if status in TERMINAL:
            if readable:  # CloudWatch gets the last lines a little after the job ends
                sleep(poll_s)
                read_new()
            return status
        sleep(poll_s)


@dataclass(frozen=True)
class TuningSpec:
    """Search space and budget: learning rate on a log scale, batch size from a list."""

    learning_rate: tuple[float, float] = (1e-4, 1e-1)
    batch_sizes: Sequence[int] = (16, 32, 64)
    max_jobs: int = 8
    max_parallel_jobs: int = 2
    strategy: str = "Bayesian"
    early_stopping: str = "Off"


TUNED = ("learning_rate", "batch_size")


@dataclass(frozen=True)
class TuningResult:
    job_name: str
    status: str
    failure_reason: str | None = None
    best_training_job: str | None = None


def tune(spec: JobSpec, tuning: TuningSpec, channels: Channels, sagemaker: SageMaker, *, wait: bool = True,
         job_name: str | None = None, sleep: Callable[[float], None] = time.sleep) -> TuningResult:
    """Start a tuning job; with ``wait``, poll until it has ended."""
    low, high = tuning.learning_rate
    if not 0 < low < high:
        raise ValueError(f"learning rate range must satisfy 0 < low < high, got {low}..{high}")
    if tuning.strategy == "Grid":
        raise ValueError("the Grid strategy takes only categorical ranges; the learning rate is a continuous one")
    if tuning.strategy == "Hyperband" and tuning.early_stopping != "Off":
        raise ValueError("Hyperband stops jobs early itself: leave --early-stopping Off")
    name = job_name or timestamped(spec.base_job_name, TUNING_NAME_LIMIT, short=True)
    definition = job_definition(spec, channels, output_path(spec, sagemaker))
    definition["StaticHyperParameters"] = {key: str(value) for key, value in spec.hyperparameters.items()
                                           if key not in TUNED}  # the tuner's value wins
    config: dict[str, Any] = {
        "Strategy": tuning.strategy,
        "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": OBJECTIVE_METRIC},
        "ResourceLimits": {"MaxNumberOfTrainingJobs": tuning.max_jobs,
                           "MaxParallelTrainingJobs": tuning.max_parallel_jobs},
        "ParameterRanges": {
            "ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": str(low), "MaxValue": str(high),
                                           "ScalingType": "Logarithmic"}],
            "CategoricalParameterRanges": [{"Name": "batch_size",
                                            "Values": [str(size) for size in tuning.batch_sizes]}],
            "IntegerParameterRanges": [],
        },
        "TrainingJobEarlyStoppingType": tuning.early_stopping,
    }
    if tuning.strategy == "Hyperband":  # its resource is the epochs each job may run
        epochs = int(spec.hyperparameters.get("epochs", 10))
        config["StrategyConfig"] = {"HyperbandStrategyConfig": {"MinResource": 1, "MaxResource": epochs}}
    sagemaker.sagemaker.create_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=name, HyperParameterTuningJobConfig=config, TrainingJobDefinition=definition,
        **spec.security.tag_list())
    while True:
        description = sagemaker.sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
        status = description["HyperParameterTuningJobStatus"]
        if status in TERMINAL or not wait:
            break
        sleep(POLL_S)
    best = (description.get("BestTrainingJob") or {}).get("TrainingJobName")
    return TuningResult(name, status, description.get("FailureReason"), best)
