"""The deploy CLI's control-plane calls, made against moto: what each command asks SageMaker for.

Everything goes through ``deploy.cli.main`` as a user would type it, against moto's in-process
SageMaker, S3 and Application Auto Scaling (no network, no account). What moto stores is read back
with the ordinary describe calls. Two things moto does not keep: a training job's
``MetricDefinitions`` (its describe answer always holds a fixed sample) — those are checked on
the request the CLI sent, recorded with a botocore event hook — and real job or endpoint
progress (everything is Completed / InService at once), so no test here depends on waiting.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from deploy import hosting, predict, session, training
from deploy.cli import main

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sagemaker-classifier:cpu-test"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerExecution"
BUCKET = "classifier-test"
MODEL_DATA = f"s3://{BUCKET}/jobs/shapes/output/model.tar.gz"


@dataclass
class Aws:
    session: boto3.Session
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def sagemaker(self) -> Any:
        return self.session.client("sagemaker")

    @property
    def autoscaling(self) -> Any:
        return self.session.client("application-autoscaling")

    def sent(self, operation: str) -> dict[str, Any]:
        """The parameters of the last ``operation`` request the CLI made."""
        matches = [params for name, params in self.requests if name == operation]
        assert matches, f"no {operation} request among {[name for name, _ in self.requests]}"
        return matches[-1]

    def run(self, *argv: str, environ: dict[str, str] | None = None) -> int:
        return main(list(argv), environ=environ or {}, boto_session=self.session)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Aws]:
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with mock_aws():
        aws = Aws(boto3.Session(region_name=REGION))

        def record(params: dict[str, Any], model: Any, **_: Any) -> None:
            aws.requests.append((model.name, params))

        # Clients copy the session's handlers when created: register before any exists.
        aws.session.events.register("before-parameter-build.sagemaker", record)
        aws.session.client("s3").create_bucket(Bucket=BUCKET)
        yield aws


def deploy_args(*extra: str) -> list[str]:
    return ["deploy", "--image-uri", IMAGE, "--role", ROLE, "--model-data", MODEL_DATA, *extra]


def test_train_asks_for_spot_capacity_checkpoints_and_the_metric_regexes(aws: Aws, capsys) -> None:
    code = aws.run(
        "train", "--image-uri", IMAGE, "--role", ROLE, "--job-name", "shapes-1",
        "--data", f"s3://{BUCKET}/shapes/train/", "--validation", f"s3://{BUCKET}/shapes/valid/",
        "--instance-type", "ml.g5.2xlarge", "--instance-count", "2", "--output-path", f"s3://{BUCKET}/jobs",
        "--hp", "epochs=5", "--hp", "learning_rate=0.01", "--hp", "pretrained=true",
        "--spot", "--checkpoint-s3-uri", f"s3://{BUCKET}/checkpoints/shapes", "--max-run", "3600",
        "--max-wait", "7200", "--no-wait",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "training job: shapes-1" in out
    assert f"model artifact: s3://{BUCKET}/jobs/shapes-1/output/model.tar.gz" in out

    job = aws.sagemaker.describe_training_job(TrainingJobName="shapes-1")
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert job["RoleArn"] == ROLE
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 2
    assert job["HyperParameters"] == {"epochs": "5", "learning_rate": "0.01", "pretrained": "true"}
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert job["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/checkpoints/shapes", "LocalPath": "/opt/ml/checkpoints"}
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/jobs"
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels == {"training": f"s3://{BUCKET}/shapes/train/", "validation": f"s3://{BUCKET}/shapes/valid/"}

    # moto answers MetricDefinitions with a fixed sample, so check what was asked for.
    sent = aws.sent("CreateTrainingJob")["AlgorithmSpecification"]["MetricDefinitions"]
    assert sent == [dict(d) for d in training.METRIC_DEFINITIONS]
    assert {d["Name"] for d in sent} >= {"validation:accuracy", "validation:loss", "train:loss",
                                         "train:images_per_second", "test:accuracy"}


def test_the_metric_regexes_read_the_lines_training_prints(capsys) -> None:
    from train.job import emit_metric  # the one place the training log's metric lines come from

    for name, value in [("validation_accuracy", 0.9123), ("validation_loss", 0.31), ("train_loss", 0.25),
                        ("train_images_per_second", 812.5)]:
        emit_metric(name, value, epoch=3)
    emit_metric("test_accuracy", 0.875)
    log = capsys.readouterr().out
    found = {}
    for definition in training.METRIC_DEFINITIONS:
        assert len(definition["Regex"]) <= 500  # SageMaker's limit
        match = re.search(definition["Regex"], log)
        assert match, f"{definition['Name']}: {definition['Regex']!r} finds nothing in\n{log}"
        found[definition["Name"]] = float(match.group(1))
    assert found == {"validation:accuracy": 0.9123, "validation:loss": 0.31, "train:loss": 0.25,
                     "train:images_per_second": 812.5, "test:accuracy": 0.875}
    assert training.OBJECTIVE_METRIC in found


def test_tune_searches_learning_rate_and_batch_size_for_validation_accuracy(aws: Aws, capsys) -> None:
    code = aws.run(
        "tune", "--image-uri", IMAGE, "--job-name", "shapes-tune", "--data", f"s3://{BUCKET}/shapes/",
        "--output-path", f"s3://{BUCKET}/tuning", "--instance-type", "ml.g4dn.xlarge",
        "--hp", "epochs=3", "--hp", "learning_rate=0.5",  # a tuned name: the tuner's value wins
        "--lr-min", "0.001", "--lr-max", "0.1", "--batch-sizes", "16,32,64",
        "--max-jobs", "6", "--max-parallel-jobs", "3", "--strategy", "Random", "--no-wait",
        environ={"SAGEMAKER_ROLE": ROLE},
    )
    assert code == 0
    assert "tuning job: shapes-tune" in capsys.readouterr().out

    job = aws.sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="shapes-tune")
    config = job["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Random"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "validation:accuracy"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 3}
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [
        {"Name": "learning_rate", "MinValue": "0.001", "MaxValue": "0.1", "ScalingType": "Logarithmic"}]
    assert ranges["CategoricalParameterRanges"] == [{"Name": "batch_size", "Values": ["16", "32", "64"]}]
    definition = job["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert definition["RoleArn"] == ROLE
    assert definition["StaticHyperParameters"] == {"epochs": "3"}
    # The objective must be one of the metrics the jobs report.
    metric_names = [d["Name"] for d in definition["AlgorithmSpecification"]["MetricDefinitions"]]
    assert "validation:accuracy" in metric_names
    sent = aws.sent("CreateHyperParameterTuningJob")["TrainingJobDefinition"]
    assert sent["AlgorithmSpecification"]["MetricDefinitions"] == [dict(d) for d in training.METRIC_DEFINITIONS]
    resources = sent.get("ResourceConfig") or sent["HyperParameterTuningResourceConfig"]
    assert resources["InstanceType"] == "ml.g4dn.xlarge"


def test_deploy_creates_an_autoscaled_endpoint_with_data_capture(aws: Aws, capsys) -> None:
    code = aws.run(*deploy_args(
        "--endpoint-name", "shapes", "--model-name", "shapes-model", "--instance-type", "ml.c5.xlarge",
        "--instance-count", "2", "--max-instances", "6", "--target-invocations", "250",
        "--scale-in-cooldown", "600", "--scale-out-cooldown", "30",
        "--capture-s3-uri", f"s3://{BUCKET}/capture", "--capture-percent", "20", "--env", "CLASSIFIER_TOP_K=3",
    ))
    assert code == 0
    out = capsys.readouterr().out
    assert "endpoint: shapes" in out and "autoscaling: 2..6 instances" in out

    model = aws.sagemaker.describe_model(ModelName="shapes-model")
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == MODEL_DATA
    assert model["PrimaryContainer"]["Environment"] == {"CLASSIFIER_TOP_K": "3"}
    assert model["ExecutionRoleArn"] == ROLE
    assert aws.sagemaker.describe_endpoint(EndpointName="shapes")["EndpointConfigName"] == "shapes"
    config = aws.sagemaker.describe_endpoint_config(EndpointConfigName="shapes")
    [variant] = config["ProductionVariants"]
    assert (variant["VariantName"], variant["ModelName"]) == ("AllTraffic", "shapes-model")
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.xlarge", 2)
    capture = config["DataCaptureConfig"]
    assert capture["EnableCapture"] is True
    assert capture["InitialSamplingPercentage"] == 20
    assert capture["DestinationS3Uri"] == f"s3://{BUCKET}/capture"
    assert {option["CaptureMode"] for option in capture["CaptureOptions"]} == {"Input", "Output"}

    [target] = aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["ResourceId"] == "endpoint/shapes/variant/AllTraffic"
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 6)
    [policy] = aws.autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["ResourceId"] == "endpoint/shapes/variant/AllTraffic"
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 250.0,
        "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        "ScaleInCooldown": 600, "ScaleOutCooldown": 30,
    }


def test_deploy_serverless_has_no_instances_and_no_scaling(aws: Aws) -> None:
    assert aws.run(*deploy_args("--endpoint-name", "shapes-sl", "--serverless", "--memory-mb", "2048",
                                "--max-concurrency", "3")) == 0
    [variant] = aws.sagemaker.describe_endpoint_config(EndpointConfigName="shapes-sl")["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 3}
    assert "InstanceType" not in variant
    assert aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_deploy_async_sends_answers_to_s3_and_scales_on_the_backlog_down_to_zero(aws: Aws, capsys) -> None:
    topics = [aws.session.client("sns").create_topic(Name=name)["TopicArn"] for name in ("done", "failed")]
    assert aws.run(*deploy_args(
        "--endpoint-name", "queued", "--model-name", "queued-model", "--async",
        "--async-output-path", f"s3://{BUCKET}/async/out/", "--async-failure-path", f"s3://{BUCKET}/async/failed/",
        "--success-topic", topics[0], "--error-topic", topics[1], "--max-concurrent-invocations", "4",
        "--max-instances", "3", "--target-backlog", "8",
    )) == 0
    out = capsys.readouterr().out
    assert f"answers: s3://{BUCKET}/async/out/" in out and "autoscaling: 0..3 instances" in out

    config = aws.sent("CreateEndpointConfig")["AsyncInferenceConfig"]
    assert config["OutputConfig"] == {
        "S3OutputPath": f"s3://{BUCKET}/async/out/", "S3FailurePath": f"s3://{BUCKET}/async/failed/",
        "NotificationConfig": {"SuccessTopic": topics[0], "ErrorTopic": topics[1]}}
    assert config["ClientConfig"] == {"MaxConcurrentInvocationsPerInstance": 4}
    [variant] = aws.sent("CreateEndpointConfig")["ProductionVariants"]
    assert variant["InitialInstanceCount"] == 1  # an endpoint starts with one; scaling may then take it to 0
    # the server takes up to 1 GB per request and an hour to answer
    assert aws.sent("CreateModel")["PrimaryContainer"]["Environment"] == {"CLASSIFIER_ASYNC": "true"}

    [target] = aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/queued/variant/AllTraffic", 0, 3)
    policies = {policy["PolicyName"]: policy for policy in
                aws.autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]}
    tracking = policies["queued-backlog-per-instance"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 8.0
    assert tracking["CustomizedMetricSpecification"]["MetricName"] == "ApproximateBacklogSizePerInstance"
    assert tracking["CustomizedMetricSpecification"]["Dimensions"] == [{"Name": "EndpointName", "Value": "queued"}]
    wake = policies["queued-backlog-without-capacity"]
    assert wake["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]
    [alarm] = aws.session.client("cloudwatch").describe_alarms()["MetricAlarms"]
    assert (alarm["MetricName"], alarm["Namespace"]) == ("HasBacklogWithoutCapacity", "AWS/SageMaker")
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "queued"}]
    assert alarm["AlarmActions"] == [wake["PolicyARN"]]

    assert aws.run("delete", "--endpoint-name", "queued") == 0
    assert "deleted alarm queued-backlog-without-capacity" in capsys.readouterr().out
    assert aws.session.client("cloudwatch").describe_alarms()["MetricAlarms"] == []
    assert aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_deploy_async_with_a_floor_keeps_instances_and_needs_no_wake_up_alarm(aws: Aws) -> None:
    assert aws.run(*deploy_args("--endpoint-name", "warm", "--async", "--async-output-path", f"s3://{BUCKET}/o/",
                                "--max-instances", "2", "--min-instances", "1")) == 0
    [target] = aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 2)
    assert aws.session.client("cloudwatch").describe_alarms()["MetricAlarms"] == []


def test_multi_model_endpoint_gets_models_added_listed_and_invoked_by_name(aws: Aws, capsys, tmp_path: Path) -> None:
    prefix = f"s3://{BUCKET}/models/"
    assert aws.run("deploy", "--image-uri", IMAGE, "--role", ROLE, "--multi-model", "--model-data", prefix,
                   "--endpoint-name", "many", "--instance-type", "ml.c5.xlarge") == 0
    assert f"every .tar.gz under {prefix}" in capsys.readouterr().out
    [variant] = aws.sagemaker.describe_endpoint_config(EndpointConfigName="many")["ProductionVariants"]
    assert variant["ModelName"].startswith("many-") and variant["InstanceType"] == "ml.c5.xlarge"
    container = aws.sagemaker.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]
    assert (container["Mode"], container["ModelDataUrl"], container["Image"]) == ("MultiModel", prefix, IMAGE)

    # Models arrive without a redeploy: a training job's artifact (copied in S3) and a local file.
    s3 = aws.session.client("s3")
    s3.put_object(Bucket=BUCKET, Key="jobs/shapes/output/model.tar.gz", Body=b"job artifact")
    aws.sagemaker.create_training_job(
        TrainingJobName="shapes-job", RoleArn=ROLE, StoppingCondition={"MaxRuntimeInSeconds": 60},
        AlgorithmSpecification={"TrainingImage": IMAGE, "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/jobs/"},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10})
    job = aws.sagemaker.describe_training_job(TrainingJobName="shapes-job")
    job_artifact = job["ModelArtifacts"]["S3ModelArtifacts"]
    s3.copy_object(Bucket=BUCKET, Key=job_artifact.split(f"s3://{BUCKET}/", 1)[1],
                   CopySource={"Bucket": BUCKET, "Key": "jobs/shapes/output/model.tar.gz"})
    assert aws.run("add-model", "--model-data-prefix", prefix, "--training-job", "shapes-job",
                   "--name", "shapes.tar.gz") == 0
    assert f"model: {prefix}shapes.tar.gz" in capsys.readouterr().out
    local = tmp_path / "dogs.tar.gz"
    local.write_bytes(b"local artifact")
    assert aws.run("add-model", "--model-data-prefix", prefix, "--model-data", str(local)) == 0
    assert "target model: dogs.tar.gz" in capsys.readouterr().out
    assert s3.get_object(Bucket=BUCKET, Key="models/shapes.tar.gz")["Body"].read() == b"job artifact"
    assert s3.get_object(Bucket=BUCKET, Key="models/dogs.tar.gz")["Body"].read() == b"local artifact"
    assert aws.run("list-models", "--model-data-prefix", prefix) == 0
    assert capsys.readouterr().out.split() == ["dogs.tar.gz", "shapes.tar.gz"]

    # Each request names its model: TargetModel on InvokeEndpoint.
    sent: list[dict[str, Any]] = []
    aws.session.events.register("before-parameter-build.sagemaker-runtime.InvokeEndpoint",
                                lambda params, **_: sent.append(dict(params)))
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    answer = json.dumps({"predictions": [{"label": "retriever", "index": 3, "probability": 0.75}]})
    sagemakerruntime_backends[ACCOUNT][REGION].results_queue.append((answer, "application/json", "AllTraffic", ""))
    photo = tmp_path / "dog.jpg"
    photo.write_bytes(b"not really a JPEG")  # moto reads request bodies as UTF-8 text
    assert aws.run("predict", "--endpoint-name", "many", "--target-model", "dogs.tar.gz", str(photo)) == 0
    assert "retriever" in capsys.readouterr().out
    [request] = sent
    assert (request["EndpointName"], request["TargetModel"]) == ("many", "dogs.tar.gz")


@pytest.mark.parametrize(("argv", "message"), [
    (["deploy", "--image-uri", IMAGE, "--role", ROLE, "--multi-model", "--model-data", f"s3://{BUCKET}/models"],
     "S3 prefix"),
    (["deploy", "--image-uri", IMAGE, "--role", ROLE, "--multi-model", "--training-job", "job"], "add-model"),
    (["deploy", "--image-uri", IMAGE, "--role", ROLE, "--multi-model", "--model-data", f"s3://{BUCKET}/m/",
      "--instance-type", "ml.g5.xlarge"], "Triton"),
    (["deploy", "--image-uri", IMAGE, "--role", ROLE, "--multi-model", "--model-data", f"s3://{BUCKET}/m/",
      "--serverless"], "serverless"),
    (["deploy", "--local", "--image-uri", IMAGE, "--multi-model", "--model-data", f"s3://{BUCKET}/m/"],
     "SAGEMAKER_MULTI_MODEL"),
    (["add-model", "--model-data-prefix", f"s3://{BUCKET}/m/", "--model-data", MODEL_DATA], "--name"),
    (["add-model", "--model-data-prefix", f"s3://{BUCKET}/m/", "--model-data", MODEL_DATA, "--name", "../x.tar.gz"],
     "target model"),
    (["add-model", "--model-data-prefix", f"s3://{BUCKET}/m/", "--model-data", "/no/such/model.tar.gz"],
     "no model artifact"),
    (["predict", "--endpoint-name", "many", "--target-model", "dogs", __file__], "target model"),
])
def test_multi_model_mistakes_stop_before_any_call(aws: Aws, capsys, argv: list[str], message: str) -> None:
    try:
        result = aws.run(*argv)
    except SystemExit as exit_info:
        result = exit_info.code
    assert result in (1, 2)
    assert message in capsys.readouterr().err
    assert [name for name, _ in aws.requests if name.startswith("Create")] == []
    assert aws.session.client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0


def test_transform_sends_each_image_whole_from_a_training_jobs_artifact(aws: Aws, capsys) -> None:
    assert aws.run("train", "--image-uri", IMAGE, "--role", ROLE, "--job-name", "shapes-2",
                   "--data", f"s3://{BUCKET}/shapes/", "--output-path", f"s3://{BUCKET}/jobs", "--no-wait") == 0
    code = aws.run("transform", "--image-uri", IMAGE, "--role", ROLE, "--training-job", "shapes-2",
                   "--model-name", "shapes-batch", "--job-name", "shapes-batch-1",
                   "--data", f"s3://{BUCKET}/unlabelled/", "--output-path", f"s3://{BUCKET}/predictions/",
                   "--instance-type", "ml.c5.2xlarge", "--instance-count", "2", "--no-wait")
    assert code == 0
    assert "transform job: shapes-batch-1" in capsys.readouterr().out

    model = aws.sagemaker.describe_model(ModelName="shapes-batch")
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/jobs/shapes-2/output/model.tar.gz"
    job = aws.sagemaker.describe_transform_job(TransformJobName="shapes-batch-1")
    assert job["ModelName"] == "shapes-batch"
    assert job["BatchStrategy"] == "SingleRecord"
    assert job["MaxPayloadInMB"] == 6
    assert job["TransformInput"]["DataSource"]["S3DataSource"] == {
        "S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/unlabelled/"}
    assert job["TransformInput"]["ContentType"] == "application/x-image"
    assert job["TransformInput"].get("SplitType", "None") == "None"
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://{BUCKET}/predictions/"
    assert job["TransformOutput"]["Accept"] == "application/json"
    assert job["TransformResources"] == {"InstanceType": "ml.c5.2xlarge", "InstanceCount": 2}


def test_delete_removes_scaling_endpoint_config_and_model_and_tolerates_leftovers(aws: Aws, capsys) -> None:
    assert aws.run(*deploy_args("--endpoint-name", "shapes", "--model-name", "shapes-model",
                                "--max-instances", "3")) == 0
    capsys.readouterr()

    assert aws.run("delete", "--endpoint-name", "shapes") == 0
    assert capsys.readouterr().out.splitlines() == [
        "deleted scaling policy shapes-invocations-per-instance",
        "deleted scalable target endpoint/shapes/variant/AllTraffic",
        "deleted endpoint shapes",
        "deleted endpoint config shapes",
        "deleted model shapes-model",
    ]
    assert aws.autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aws.autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    for describe, key in [(aws.sagemaker.describe_endpoint, "EndpointName"),
                          (aws.sagemaker.describe_endpoint_config, "EndpointConfigName")]:
        with pytest.raises(ClientError):
            describe(**{key: "shapes"})
    with pytest.raises(ClientError):
        aws.sagemaker.describe_model(ModelName="shapes-model")

    assert aws.run("delete", "--endpoint-name", "shapes") == 0
    assert "nothing to delete for endpoint shapes" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["train", "--image-uri", IMAGE, "--role", ROLE, "--data", "s3://b/d", "--spot"], 2, "--checkpoint-s3-uri"),
    (["train", "--image-uri", IMAGE, "--data", "s3://b/d"], 2, "--role"),
    (["train", "--local", "--image-uri", IMAGE, "--data", "file:///d"], 2, "--output-path"),
    (deploy_args("--max-instances", "4", "--no-wait"), 2, "InService"),
    (deploy_args("--serverless", "--max-instances", "4"), 2, "autoscaling"),
    (["tune", "--image-uri", IMAGE, "--role", ROLE, "--data", "s3://b/d", "--lr-min", "0.1", "--lr-max", "0.01"],
     1, "learning rate"),
    (deploy_args("--async"), 2, "--async-output-path"),
    (["train", "--local", "--image-uri", IMAGE, "--data", "file:///d", "--output-path", "file:///o",
      "--checkpoint-s3-uri", f"s3://{BUCKET}/c/"], 2, "--checkpoint-s3-uri are for AWS"),
    (["tune", "--image-uri", IMAGE, "--role", ROLE, "--data", f"s3://{BUCKET}/d/", "--strategy", "Grid"], 1,
     "Grid strategy takes only categorical ranges"),
    (deploy_args("--subnets", "subnet-1"), 2, "a VPC needs both subnets and security groups"),
    (deploy_args("--async-output-path", "s3://b/o/"), 2, "only with --async"),
    (deploy_args("--async", "--async-output-path", "s3://b/o/", "--serverless"), 2, "--async is for"),
    (deploy_args("--async", "--async-output-path", "s3://b/o/", "--async-failure-path", "/tmp/f"), 2, "s3://"),
    (deploy_args("--async", "--async-output-path", "s3://b/o/", "--max-concurrent-invocations", "0"), 2,
     "at least 1"),
])
def test_impossible_requests_stop_before_any_call(aws: Aws, capsys, argv: list[str], code: int, message: str) -> None:
    try:
        result = aws.run(*argv)
    except SystemExit as exit_info:  # argparse's way out: usage errors
        result = exit_info.code
    assert result == code
    assert message in capsys.readouterr().err
    assert [name for name, _ in aws.requests if name.startswith("Create")] == []


def test_a_missing_region_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["delete", "--endpoint-name", "shapes"], environ={}) == 1
    assert "region" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "tune", "deploy", "transform", "predict", "delete",
                                     "add-model", "list-models"])
def test_every_subcommand_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"python -m deploy {command}" in capsys.readouterr().out


def test_predict_finds_images_by_file_folder_and_glob(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("a/1.png", "a/2.JPG", "a/notes.txt", "b.jpeg", "c.bin"):
        (tmp_path / name).write_bytes(b"x")
    found = predict.find_images([str(tmp_path / "a"), str(tmp_path / "*.jpeg"), str(tmp_path / "c.bin"),
                                 str(tmp_path / "a" / "1.png")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/1.png", "a/2.JPG", "b.jpeg", "c.bin"]
    assert [predict.content_type(p) for p in found] == ["image/png", "image/jpeg", "image/jpeg",
                                                          "application/x-image"]
    with pytest.raises(FileNotFoundError):
        predict.find_images([str(tmp_path / "missing*.png")])



def test_train_without_an_output_path_uses_sagemakers_default_bucket(aws: Aws, capsys) -> None:
    assert aws.run("train", "--image-uri", IMAGE, "--role", ROLE, "--job-name", "shapes-2",
                   "--data", f"s3://{BUCKET}/shapes/", "--no-wait") == 0
    bucket = f"sagemaker-{REGION}-{ACCOUNT}"
    assert bucket in [b["Name"] for b in aws.session.client("s3").list_buckets()["Buckets"]]
    job = aws.sagemaker.describe_training_job(TrainingJobName="shapes-2")
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{bucket}/"
    assert f"model artifact: s3://{bucket}/shapes-2/output/model.tar.gz" in capsys.readouterr().out


class FakeLogs:
    """CloudWatch Logs' filter_log_events over events that appear as the job runs, two a page."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []

    def write(self, host: str, message: str, timestamp: int) -> None:
        self.events.append({"eventId": str(len(self.events)), "timestamp": timestamp, "message": message,
                            "logStreamName": f"job-1/{host}-1733256000"})

    def filter_log_events(self, **arguments: Any) -> dict[str, Any]:
        self.calls.append(arguments)
        if not self.events:
            raise ClientError({"Error": {"Code": "ResourceNotFoundException", "Message": "no group"}}, "FilterLogEvents")
        found = sorted((event for event in self.events if event["timestamp"] >= arguments["startTime"]),
                       key=lambda event: event["timestamp"])
        offset = int(arguments.get("nextToken") or 0)
        page: dict[str, Any] = {"events": found[offset:offset + 2]}
        if offset + 2 < len(found):
            page["nextToken"] = str(offset + 2)
        return page


def test_waiting_for_a_job_prints_its_log_until_it_ends() -> None:
    """Two hosts; a line that reaches CloudWatch after newer ones; the last lines arriving after
    the job has ended: each printed once, with its host."""
    logs = FakeLogs()
    progress = iter([
        ("InProgress", []),  # instances starting: no log yet
        ("InProgress", [("algo-1", "epoch 1", 1_000), ("algo-1", "epoch 2", 2_000), ("algo-1", "epoch 3", 3_000)]),
        ("InProgress", [("algo-2", "late line", 1_500)]),  # older than what was read already
        ("Failed", []),
    ])

    class Client:
        def describe_training_job(self, TrainingJobName: str) -> dict[str, str]:
            status, lines = next(progress)
            for host, message, timestamp in lines:
                logs.write(host, message, timestamp)
            return {"TrainingJobStatus": status}

    sagemaker = session.SageMaker(boto3.Session(region_name=REGION), Client(), runtime=None)
    sagemaker.client = lambda service: logs  # type: ignore[method-assign]
    printed: list[str] = []
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 4:  # after the job ended: its traceback reaches CloudWatch
            logs.write("algo-2", "Traceback: out of memory", 4_000)

    status = training.follow_training_log(sagemaker, "job-1", printed.append, poll_s=7, sleep=sleep)
    assert status == "Failed"
    assert printed == ["epoch 1", "epoch 2", "epoch 3", "[algo-2] late line", "[algo-2] Traceback: out of memory"]
    assert sleeps == [7, 7, 7, 7]  # between looks, and once after the end for the last lines
    assert {call["logStreamNamePrefix"] for call in logs.calls} == {"job-1/"}

class FailingJobs:
    """A SageMaker API whose jobs fail: what the CLI asked for, and the failure it reads back."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create_training_job(self, **request: Any) -> None:
        self.created.append(request["TrainingJobName"])

    def describe_training_job(self, TrainingJobName: str) -> dict[str, Any]:
        return {"TrainingJobStatus": "Failed", "FailureReason": "AlgorithmError: out of memory"}

    def create_hyper_parameter_tuning_job(self, **request: Any) -> None:
        self.created.append(request["HyperParameterTuningJobName"])

    def describe_hyper_parameter_tuning_job(self, HyperParameterTuningJobName: str) -> dict[str, Any]:
        return {"HyperParameterTuningJobStatus": "Failed", "FailureReason": "every training job failed"}


def test_a_failed_job_exits_1_with_its_reason(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    api = FailingJobs()
    fake = session.SageMaker(boto3.Session(region_name=REGION), api, runtime=None)
    fake.client = lambda service: FakeLogs()  # type: ignore[method-assign]  # no log lines
    monkeypatch.setattr("deploy.cli.make_session", lambda args, boto_session, environ: fake)
    monkeypatch.setattr(training.time, "sleep", lambda seconds: None)
    common = ["--image-uri", IMAGE, "--role", ROLE, "--data", f"s3://{BUCKET}/d/", "--output-path", f"s3://{BUCKET}/o/"]
    assert main(["train", *common], environ={}) == 1
    out = capsys.readouterr().out
    assert "status: Failed" in out and "reason: AlgorithmError: out of memory" in out
    assert "model artifact" not in out  # there is none
    assert main(["tune", *common], environ={}) == 1
    out = capsys.readouterr().out
    assert "status: Failed" in out and "reason: every training job failed" in out
    assert len(api.created) == 2 and len(api.created[1]) <= 32 and api.created[1].startswith("image-classifier-")


def test_network_encryption_and_tags_reach_every_request(aws: Aws) -> None:
    security = ["--subnets", "subnet-1,subnet-2", "--security-group-ids", "sg-1", "--kms-key", "alias/ml",
                "--network-isolation", "--tag", "team=vision"]
    assert aws.run("train", "--image-uri", IMAGE, "--role", ROLE, "--job-name", "secure", "--data", f"s3://{BUCKET}/d/",
                   "--output-path", f"s3://{BUCKET}/o/", "--encrypt-inter-container-traffic", "--no-wait",
                   *security) == 0
    job = aws.sent("CreateTrainingJob")
    assert job["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    assert job["OutputDataConfig"]["KmsKeyId"] == job["ResourceConfig"]["VolumeKmsKeyId"] == "alias/ml"
    assert job["EnableNetworkIsolation"] and job["EnableInterContainerTrafficEncryption"]
    assert job["Tags"] == [{"Key": "team", "Value": "vision"}]
    assert aws.run(*deploy_args("--endpoint-name", "secure", *security)) == 0
    model = aws.sent("CreateModel")
    assert model["VpcConfig"]["Subnets"] == ["subnet-1", "subnet-2"] and model["EnableNetworkIsolation"]
    assert aws.sent("CreateEndpointConfig")["KmsKeyId"] == "alias/ml"
    assert aws.sent("CreateEndpoint")["Tags"] == [{"Key": "team", "Value": "vision"}]


def test_a_role_name_is_looked_up_and_a_half_made_endpoint_leaves_no_model(aws: Aws, monkeypatch) -> None:
    arn = aws.session.client("iam").create_role(RoleName="SageMakerRun", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    original = hosting.deploy

    def failing(sagemaker, model_name, **kwargs):  # type: ignore[no-untyped-def]
        raise ClientError({"Error": {"Code": "ResourceLimitExceeded", "Message": "no ml.c5.xlarge left"}},
                          "CreateEndpoint")

    monkeypatch.setattr(hosting, "deploy", failing)
    assert aws.run("deploy", "--image-uri", IMAGE, "--role", "SageMakerRun", "--model-data", MODEL_DATA,
                   "--endpoint-name", "half") == 1
    assert aws.sent("CreateModel")["ExecutionRoleArn"] == arn
    assert aws.sagemaker.list_models()["Models"] == []  # deleted again
    monkeypatch.setattr(hosting, "deploy", original)
    assert aws.run("deploy", "--image-uri", IMAGE, "--role", "SageMakerRun", "--model-data", MODEL_DATA,
                   "--endpoint-name", "half") == 0


def test_the_default_bucket_must_belong_to_the_account() -> None:
    class Sts:
        def get_caller_identity(self) -> dict[str, str]:
            return {"Account": ACCOUNT}

    class S3:
        def head_bucket(self, **arguments: str) -> None:
            assert arguments["ExpectedBucketOwner"] == ACCOUNT
            raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")

    fake = session.SageMaker(boto3.Session(region_name=REGION), sagemaker=None, runtime=None)
    fake.client = lambda service: {"sts": Sts(), "s3": S3()}[service]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="may belong to another account\\): pass --output-path"):
        fake.default_bucket()


def test_free_ports_come_from_outside_the_ephemeral_range() -> None:
    """Outgoing connections take ports from the ephemeral range: a port from there could be gone
    before the server that was given it binds it."""
    from deploy import host

    assert host.ports_outside((32768, 60999)) == [range(10_000, 32768), range(61000, 65536)]
    assert host.ports_outside((1024, 65535)) == []  # a widened range leaves nothing outside it
    assert host.ports_outside((1024, 5000)) == [range(10_000, 65536)]  # never below LOWEST_PORT
    outside = host.ports_outside(host.ephemeral_range())
    ports = [host.free_port() for _ in range(5)]
    if outside:
        assert all(any(port in span for span in outside) for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free when given


def test_a_port_is_never_given_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy import host

    first, second = host.free_port(), host.free_port()  # two free ports, each a range of its own
    monkeypatch.setattr(host, "_given_ports", set())
    monkeypatch.setattr(host, "ports_outside", lambda ephemeral: [range(first, first + 1), range(second, second + 1)])
    assert {host.free_port(), host.free_port()} == {first, second}  # both ranges are drawn from
    with pytest.raises(RuntimeError, match="no free TCP port"):
        host.free_port()


def test_where_the_ephemeral_range_leaves_nothing_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy import host

    monkeypatch.setattr(host, "ephemeral_range", lambda: (1024, 65535))
    port = host.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_waiting_for_ping_stops_when_the_server_has_exited() -> None:
    """A server that died while starting is reported at once, with what describe() says, not
    after the whole timeout."""
    from deploy import host

    with pytest.raises(RuntimeError, match="the server exited before .*/ping answered 200\nsee server.log"):
        host.wait_for_ping(f"http://127.0.0.1:{host.free_port()}", timeout_s=5, describe=lambda: "see server.log",
                           exited=lambda: True)
