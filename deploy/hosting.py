"""Models and endpoints as SageMaker API requests: deploy (real-time, serverless, asynchronous or
multi-model), autoscaling, multi-model artifacts, delete."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, WaiterError

from deploy.session import SageMaker, split_s3_uri
from deploy.training import Security

logger = logging.getLogger(__name__)

VARIANT = "AllTraffic"  # a model's only production variant
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"


@dataclass(frozen=True)
class Autoscaling:
    """Target tracking on SageMakerVariantInvocationsPerInstance (invocations per instance per minute)."""

    min_instances: int
    max_instances: int
    target_invocations: float = 100.0
    scale_in_cooldown_s: int = 300
    scale_out_cooldown_s: int = 60

    def __post_init__(self) -> None:
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError(f"autoscaling needs 1 <= min instances ({self.min_instances}) <= max instances "
                             f"({self.max_instances})")


@dataclass(frozen=True)
class Asynchronous:
    """An asynchronous endpoint: requests name an S3 input (up to 1 GB), answers land in S3."""

    output_path: str
    failure_path: str | None = None
    success_topic: str | None = None
    error_topic: str | None = None
    max_concurrent_invocations: int | None = None  # per instance; None: SageMaker chooses

    def config(self) -> dict[str, Any]:
        """The endpoint config's ``AsyncInferenceConfig``."""
        output: dict[str, Any] = {"S3OutputPath": self.output_path}
        if self.failure_path:
            output["S3FailurePath"] = self.failure_path
        topics = {key: value for key, value in (("SuccessTopic", self.success_topic),
                                                 ("ErrorTopic", self.error_topic)) if value}
        if topics:
            output["NotificationConfig"] = topics
        config: dict[str, Any] = {"OutputConfig": output}
        if self.max_concurrent_invocations is not None:
            config["ClientConfig"] = {"MaxConcurrentInvocationsPerInstance": self.max_concurrent_invocations}
        return config


@dataclass(frozen=True)
class BacklogScaling:
    """An asynchronous endpoint's instances follow its queue, down to zero when it is empty."""

    min_instances: int
    max_instances: int
    target_backlog: float = 5.0  # queued requests per instance to aim for
    scale_in_cooldown_s: int = 300
    scale_out_cooldown_s: int = 60

    def __post_init__(self) -> None:
        if not 0 <= self.min_instances <= self.max_instances or self.max_instances < 1:
            raise ValueError(f"backlog scaling needs 0 <= min instances ({self.min_instances}) <= max instances "
                             f"({self.max_instances}) and max instances >= 1")


@dataclass(frozen=True)
class Serverless:
    memory_mb: int = 3072
    max_concurrency: int = 5


@dataclass(frozen=True)
class ModelSpec:
    """A SageMaker model of the image: one artifact, or (multi-model) every artifact under a prefix."""

    image_uri: str
    model_data: str  # model.tar.gz; with multi_model, the S3 prefix ending in /
    role: str
    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    multi_model: bool = False
    security: Security = field(default_factory=Security)

    def __post_init__(self) -> None:
        if self.multi_model:
            check_model_prefix(self.model_data)


def model_data_of(sagemaker: SageMaker, training_job: str) -> str:
    """The model artifact a finished training job wrote."""
    description = sagemaker.sagemaker.describe_training_job(TrainingJobName=training_job)
    artifacts = description.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if not artifacts:
        raise ValueError(f"training job {training_job} has no model artifact (status "
                         f"{description.get('TrainingJobStatus')})")
    return artifacts


def create_model(sagemaker: SageMaker, spec: ModelSpec) -> str:
    """CreateModel; returns its name. A multi-model container loads each ``<prefix><name>.tar.gz``
    that a request names (``TargetModel``) on first use, and unloads the least used under memory
    pressure."""
    container: dict[str, Any] = {"Image": spec.image_uri, "ModelDataUrl": spec.model_data,
                                 "Environment": dict(spec.env)}
    if spec.multi_model:
        container["Mode"] = "MultiModel"
    options: dict[str, Any] = {**spec.security.vpc_config(), **spec.security.tag_list()}
    if spec.security.network_isolation:
        options["EnableNetworkIsolation"] = True
    sagemaker.sagemaker.create_model(ModelName=spec.name, PrimaryContainer=container, ExecutionRoleArn=spec.role,
                                     **options)
    return spec.name


def check_model_prefix(prefix: str) -> None:
    if not prefix.startswith("s3://") or not prefix.endswith("/"):
        raise ValueError(f"a multi-model endpoint's models live under an S3 prefix (s3://bucket/models/), "
                         f"not {prefix!r}")


def check_target_model(name: str) -> None:
    """A model's name on a multi-model endpoint: its artifact's path under the prefix."""
    if not name.endswith(".tar.gz") or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"a target model is the path of a .tar.gz under the endpoint's prefix "
                         f"(e.g. dogs.tar.gz), not {name!r}")


def add_model(sagemaker: SageMaker, model_data_prefix: str, source: str, name: str) -> str:
    """Copy an S3 artifact (or upload a local one) to ``<prefix><name>``, where a multi-model
    endpoint serving the prefix finds it; returns its S3 URI. The endpoint needs no update."""
    check_model_prefix(model_data_prefix)
    check_target_model(name)
    if not source.startswith("s3://") and not Path(source).is_file():
        raise ValueError(f"no model artifact at {source!r}: give a model.tar.gz file or an s3:// URI")
    bucket, prefix = split_s3_uri(model_data_prefix)
    key = prefix + name
    s3 = sagemaker.client("s3")
    if source.startswith("s3://"):
        source_bucket, source_key = split_s3_uri(source)
        s3.copy({"Bucket": source_bucket, "Key": source_key}, bucket, key)
    else:
        s3.upload_file(source, bucket, key)
    return f"s3://{bucket}/{key}"


def list_models(sagemaker: SageMaker, model_data_prefix: str) -> list[str]:
    """The target-model names under a multi-model prefix (every .tar.gz below it)."""
    check_model_prefix(model_data_prefix)
    bucket, prefix = split_s3_uri(model_data_prefix)
    names = []
    for page in sagemaker.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        names += [item["Key"][len(prefix):] for item in page.get("Contents", []) if item["Key"].endswith(".tar.gz")]
    return sorted(names)


def deploy(sagemaker: SageMaker, model_name: str, *, endpoint_name: str, instance_type: str | None = None,
           instance_count: int = 1, serverless: Serverless | None = None, asynchronous: Asynchronous | None = None,
           capture_s3_uri: str | None = None, capture_percent: int = 100, wait: bool = True,
           security: Security | None = None) -> str:
    """Create the endpoint config (named as the endpoint) and the endpoint; returns the endpoint name.
    In local mode the endpoint's container is running and answering /ping when this returns."""
    security = security or Security()
    variant: dict[str, Any] = {"VariantName": VARIANT, "ModelName": model_name}
    if serverless:
        variant["ServerlessConfig"] = {"MemorySizeInMB": serverless.memory_mb,
                                       "MaxConcurrency": serverless.max_concurrency}
    else:
        variant.update(InstanceType=instance_type, InitialInstanceCount=instance_count)
    config: dict[str, Any] = {"EndpointConfigName": endpoint_name, "ProductionVariants": [variant],
                              **security.tag_list()}
    if security.kms_key and not serverless:  # the instances' volumes (serverless has none)
        config["KmsKeyId"] = security.kms_key
    if capture_s3_uri:
        config["DataCaptureConfig"] = {
            "EnableCapture": True, "InitialSamplingPercentage": capture_percent, "DestinationS3Uri": capture_s3_uri,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}]}
        if security.kms_key:
            config["DataCaptureConfig"]["KmsKeyId"] = security.kms_key
    if asynchronous:
        config["AsyncInferenceConfig"] = asynchronous.config()
        if security.kms_key:
            config["AsyncInferenceConfig"]["OutputConfig"]["KmsKeyId"] = security.kms_key
    sagemaker.sagemaker.create_endpoint_config(**config)
    sagemaker.sagemaker.create_endpoint(EndpointName=endpoint_name, EndpointConfigName=endpoint_name,
                                        **security.tag_list())
    if wait and not sagemaker.local:
        wait_for_endpoint(sagemaker.sagemaker, endpoint_name)
    return endpoint_name


def wait_for_endpoint(client: Any, endpoint_name: str, *, delay_s: int = 30, max_attempts: int = 60) -> None:
    """Until InService (at most ``delay_s * max_attempts``); a failed endpoint raises with its reason."""
    try:
        client.get_waiter("endpoint_in_service").wait(
            EndpointName=endpoint_name, WaiterConfig={"Delay": delay_s, "MaxAttempts": max_attempts})
    except WaiterError as error:
        reason = (error.last_response or {}).get("FailureReason", str(error))
        raise RuntimeError(f"endpoint {endpoint_name} did not come into service: {reason}") from None


def resource_id(endpoint_name: str, variant: str = VARIANT) -> str:
    return f"endpoint/{endpoint_name}/variant/{variant}"


def _track_target(autoscaling_client: Any, resource: str, scaling: Autoscaling | BacklogScaling, policy: str,
                  target: float, metric: dict[str, Any]) -> None:
    """Register the variant as a scalable target and attach a target-tracking policy on ``metric``."""
    autoscaling_client.register_scalable_target(
        ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
        MinCapacity=scaling.min_instances, MaxCapacity=scaling.max_instances,
    )
    autoscaling_client.put_scaling_policy(
        PolicyName=policy, ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": target, **metric,
            "ScaleInCooldown": scaling.scale_in_cooldown_s,
            "ScaleOutCooldown": scaling.scale_out_cooldown_s,
        },
    )


def configure_autoscaling(autoscaling_client: Any, endpoint_name: str, scaling: Autoscaling,
                          variant: str = VARIANT) -> str:
    """Target tracking on invocations per instance. The endpoint must be InService first. Returns
    the policy name."""
    policy = f"{endpoint_name}-invocations-per-instance"
    _track_target(autoscaling_client, resource_id(endpoint_name, variant), scaling, policy, scaling.target_invocations,
                  {"PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}})
    return policy


def configure_backlog_scaling(autoscaling_client: Any, cloudwatch_client: Any, endpoint_name: str,
                              scaling: BacklogScaling, variant: str = VARIANT) -> list[str]:
    """Scale an asynchronous endpoint on its backlog: target tracking on queued requests per
    instance and, since that metric has no instances to divide by at zero, a step policy that adds
    one instance when requests wait with none running (an alarm on HasBacklogWithoutCapacity).
    Returns the policy names."""
    resource = resource_id(endpoint_name, variant)
    backlog_policy = f"{endpoint_name}-backlog-per-instance"
    _track_target(autoscaling_client, resource, scaling, backlog_policy, scaling.target_backlog, {
        "CustomizedMetricSpecification": {
            "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker",
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint_name}], "Statistic": "Average",
        },
    })
    if scaling.min_instances > 0:
        return [backlog_policy]
    wake_policy = f"{endpoint_name}-backlog-without-capacity"
    policy_arn = autoscaling_client.put_scaling_policy(
        PolicyName=wake_policy, ServiceNamespace="sagemaker", ResourceId=resource,
        ScalableDimension=SCALABLE_DIMENSION, PolicyType="StepScaling",
        StepScalingPolicyConfiguration={
            "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average",
            "Cooldown": scaling.scale_out_cooldown_s,
            "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
        },
    )["PolicyARN"]
    cloudwatch_client.put_metric_alarm(
        AlarmName=wake_policy, AlarmDescription=f"requests wait for {endpoint_name} and no instance runs",
        Namespace="AWS/SageMaker", MetricName="HasBacklogWithoutCapacity",
        Dimensions=[{"Name": "EndpointName", "Value": endpoint_name}], Statistic="Average",
        Period=60, EvaluationPeriods=2, DatapointsToAlarm=2, Threshold=1,
        ComparisonOperator="GreaterThanOrEqualToThreshold", TreatMissingData="missing",
        AlarmActions=[policy_arn],
    )
    return [backlog_policy, wake_policy]


def _not_found(error: ClientError) -> bool:
    # SageMaker answers describe/delete of a missing resource with ValidationException ("Could not
    # find ..."); Application Auto Scaling with ObjectNotFoundException.
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "")
    return code in ("ObjectNotFoundException", "ResourceNotFound") or (
        code == "ValidationException" and ("not find" in message or "does not exist" in message))


def delete(sagemaker: SageMaker, endpoint_name: str, autoscaling_client: Any | None = None,
           cloudwatch_client: Any | None = None) -> list[str]:
    """Delete the scaling target (and an asynchronous endpoint's wake-up alarm), endpoint, endpoint
    config and models; returns what was deleted.

    Anything already gone is skipped, so this also cleans up after a half-finished deploy.
    """
    client = sagemaker.sagemaker
    deleted: list[str] = []

    def attempt(what: str, call: Any, **kwargs: Any) -> Any:
        try:
            result = call(**kwargs)
        except ClientError as error:
            if not _not_found(error):
                raise
            logger.info("%s: not found", what)
            return None
        deleted.append(what)
        return result

    def describe(call: Any, **kwargs: str) -> dict[str, Any] | None:
        try:
            return call(**kwargs)
        except ClientError as error:
            if _not_found(error):
                return None
            raise

    endpoint = describe(client.describe_endpoint, EndpointName=endpoint_name)
    config_name = endpoint["EndpointConfigName"] if endpoint else endpoint_name  # deploy names both alike
    config = describe(client.describe_endpoint_config, EndpointConfigName=config_name)
    variants = config["ProductionVariants"] if config else []
    if autoscaling_client is not None:
        for variant in variants:
            resource = resource_id(endpoint_name, variant["VariantName"])
            # Deregistering a target deletes its policies too, but saying which is clearer.
            policies = autoscaling_client.describe_scaling_policies(
                ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
            )["ScalingPolicies"]
            for policy in policies:
                attempt(f"scaling policy {policy['PolicyName']}", autoscaling_client.delete_scaling_policy,
                        PolicyName=policy["PolicyName"], ServiceNamespace="sagemaker", ResourceId=resource,
                        ScalableDimension=SCALABLE_DIMENSION)
            attempt(f"scalable target {resource}", autoscaling_client.deregister_scalable_target,
                    ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION)
    if cloudwatch_client is not None:
        alarm = f"{endpoint_name}-backlog-without-capacity"
        try:
            exists = bool(cloudwatch_client.describe_alarms(AlarmNames=[alarm])["MetricAlarms"])
        except ClientError as error:  # no CloudWatch permission need not keep the endpoint alive
            logger.warning("could not look for alarm %s: %s", alarm, error)
            exists = False
        if exists:
            attempt(f"alarm {alarm}", cloudwatch_client.delete_alarms, AlarmNames=[alarm])
    attempt(f"endpoint {endpoint_name}", client.delete_endpoint, EndpointName=endpoint_name)
    if config:
        attempt(f"endpoint config {config_name}", client.delete_endpoint_config, EndpointConfigName=config_name)
    for model_name in dict.fromkeys(variant["ModelName"] for variant in variants):
        attempt(f"model {model_name}", client.delete_model, ModelName=model_name)
    return deleted


def local_endpoint_answers(port: int, host: str = "localhost", timeout_s: float = 2) -> bool:
    """Whether a local-mode endpoint still answers /ping with 200 (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/ping", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
