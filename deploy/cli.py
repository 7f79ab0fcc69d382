"""``python -m deploy``: train, tune, deploy, transform, predict and delete with the image.

Examples (``--help`` on each subcommand lists every flag)::

    python -m deploy train --image-uri $IMAGE --role $ROLE --data s3://bucket/shapes/ \\
        --instance-type ml.g5.xlarge --hp epochs=10 --hp learning_rate=0.01 \\
        --spot --checkpoint-s3-uri s3://bucket/checkpoints/shapes/
    python -m deploy tune --image-uri $IMAGE --role $ROLE --data s3://bucket/shapes/ --max-jobs 8
    python -m deploy deploy --image-uri $IMAGE --role $ROLE --training-job JOB \\
        --endpoint-name shapes --max-instances 4
    python -m deploy predict --endpoint-name shapes photos/*.jpg
    python -m deploy deploy --image-uri $IMAGE --role $ROLE --multi-model \\
        --model-data s3://bucket/models/ --endpoint-name many
    python -m deploy add-model --model-data-prefix s3://bucket/models/ --training-job JOB --name dogs.tar.gz
    python -m deploy predict --endpoint-name many --target-model dogs.tar.gz photos/*.jpg
    python -m deploy transform --image-uri $IMAGE --role $ROLE --training-job JOB \\
        --data s3://bucket/unlabelled/ --output-path s3://bucket/predictions/
    python -m deploy delete --endpoint-name shapes
    python -m deploy package --architecture resnet50 --weights dogs.pth --classes classes.txt --output model/

Everything also runs in the SDK's local mode (Docker on this machine, no AWS account needed, a
region still is), with ``file://`` data and outputs::

    python -m deploy train --local --image-uri $IMAGE --data file://$PWD/data \\
        --output-path file://$PWD/out --hp epochs=5
    python -m deploy deploy --local --image-uri $IMAGE --model-data file://$PWD/out/model.tar.gz
    python -m deploy predict --local --endpoint-name ... image.png      # from another shell

A local endpoint lives as long as the ``deploy --local`` process: Ctrl-C deletes it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from deploy import batch, check, hosting, package, predict, session, training

PROG = "python -m deploy"
ROLE_ENV = "SAGEMAKER_ROLE"
DEFAULT_TRAINING_INSTANCE = "ml.g5.xlarge"
DEFAULT_HOSTING_INSTANCE = "ml.m5.xlarge"
LOCAL_POLL_S = 5
# SageMaker's multi-model endpoints on these run only its Triton container.
GPU_INSTANCE_FAMILIES = ("ml.g", "ml.p", "ml.inf", "ml.trn")


class UsageError(Exception):
    """A flag combination that cannot work; reported like an argparse error."""


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def default_name(prefix: str) -> str:
    return f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


# --- the parser ------------------------------------------------------------------------------


def _common(local: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--region", help="AWS region (default: the AWS configuration's; local mode needs one too)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the SDK does")
    if local:
        group = parser.add_argument_group("local mode")
        group.add_argument("--local", action="store_true",
                           help="run in the SDK's local mode: containers on this machine, file:// data, no AWS")
        group.add_argument("--port", type=int, default=session.DEFAULT_LOCAL_PORT,
                           help="host port of the local endpoint (default: %(default)s)")
        group.add_argument("--container-root", help="folder for local mode's compose files and /opt/ml folders "
                                                    "(default: the system temp folder)")
    return parser


def _security(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network and encryption (AWS; docs/security.md)")
    group.add_argument("--subnets", type=comma_list, default=[], metavar="ID,ID,...",
                       help="run in your VPC: its subnets (with --security-group-ids)")
    group.add_argument("--security-group-ids", type=comma_list, default=[], metavar="ID,ID,...")
    group.add_argument("--kms-key", help="KMS key for the outputs and attached volumes")
    group.add_argument("--network-isolation", action="store_true", help="no network access from the container")
    group.add_argument("--encrypt-inter-container-traffic", action="store_true",
                       help="encrypt what hosts of one training job send each other")
    group.add_argument("--tag", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                       help="tag for what is created (repeatable)")


def _role(parser: argparse.ArgumentParser, local: bool) -> None:
    parser.add_argument("--role", help=f"execution role ARN (default: ${ROLE_ENV}"
                                       + ("; not needed with --local)" if local else ")"))


def _job(local: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--image-uri", required=True,
                        help="the training image (ECR URI" + (", or a local tag with --local)" if local else ")"))
    _role(parser, local)
    parser.add_argument("--data", required=True, help="training ImageFolder (s3:// prefix"
                        + (", or file:// folder with --local" if local else "") + "); may hold train/ valid/ test/")
    parser.add_argument("--validation", help="validation ImageFolder (channel 'validation')")
    parser.add_argument("--test", help="test ImageFolder (channel 'test')")
    parser.add_argument("--input-mode", choices=("File", "FastFile"), default="File")
    parser.add_argument("--instance-type", help=f"default: {DEFAULT_TRAINING_INSTANCE}" + (
        ", or 'local' with --local ('local_gpu' for the GPU image)" if local else ""))
    parser.add_argument("--instance-count", type=int, default=1, help="hosts; more than one trains data-parallel")
    parser.add_argument("--volume-size", type=int, default=30, help="GB of disk per host (default: %(default)s)")
    parser.add_argument("--output-path", help="where model.tar.gz goes (default: the session's default bucket"
                        + ("; file://... and required with --local)" if local else ")"))
    parser.add_argument("--hp", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="hyperparameter (repeatable; see the README's table), passed as a string")
    parser.add_argument("--max-run", type=int, default=24 * 3600, help="seconds (default: %(default)s)")
    parser.add_argument("--base-job-name", default="image-classifier")
    parser.add_argument("--job-name", help="exact job name (default: base name + timestamp)")
    parser.add_argument("--checkpoint-s3-uri", help="checkpoints are synced there (resume after interruption)")
    parser.add_argument("--spot", action="store_true", help="managed spot training (needs --checkpoint-s3-uri)")
    parser.add_argument("--max-wait", type=int, help="with --spot: seconds to wait for capacity plus run time "
                                                     "(default: twice --max-run)")
    parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="wait for the job and stream its log (default: wait)")
    _security(parser)
    return parser


def _model(parser: argparse.ArgumentParser, local: bool) -> None:
    parser.add_argument("--image-uri", required=True,
                        help="the serving image (ECR URI" + (", or a local tag with --local)" if local else ")"))
    _role(parser, local)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-data", help="model.tar.gz (s3://" + (", or file:// with --local)" if local else ")")
                        + ("; with --multi-model, the S3 prefix of the models (s3://bucket/models/)" if local else ""))
    source.add_argument("--training-job", help="use the artifact of this finished training job")
    parser.add_argument("--model-name", help="default: generated from the image name")
    parser.add_argument("--env", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="serving environment variable, e.g. CLASSIFIER_TOP_K=3 (repeatable)")
    _security(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("train", parents=[_common(local=True), _job(local=True)],
                        help="run a training job", description="Run a training job with the image.")

    tune = commands.add_parser("tune", parents=[_common(local=False), _job(local=False)],
                               help="run a hyperparameter tuning job",
                               description=f"Tune learning_rate (log scale) and batch_size to maximise "
                                           f"{training.OBJECTIVE_METRIC}. --hp values are the fixed ones.")
    tune.add_argument("--lr-min", type=float, default=1e-4)
    tune.add_argument("--lr-max", type=float, default=1e-1)
    tune.add_argument("--batch-sizes", type=int_list, default=[16, 32, 64], metavar="N,N,...",
                      help="batch sizes to choose from (default: 16,32,64)")
    tune.add_argument("--max-jobs", type=int, default=8)
    tune.add_argument("--max-parallel-jobs", type=int, default=2)
    tune.add_argument("--strategy", choices=("Bayesian", "Random", "Hyperband", "Grid"), default="Bayesian")
    tune.add_argument("--early-stopping", choices=("Off", "Auto"), default="Off")

    deploy = commands.add_parser("deploy", parents=[_common(local=True)], help="create an endpoint",
                                 description="Create a real-time endpoint (optionally autoscaled), a "
                                             "serverless one, or a multi-model one. With --local it serves "
                                             "until Ctrl-C.")
    _model(deploy, local=True)
    deploy.add_argument("--endpoint-name", help="default: image-classifier-<timestamp>")
    deploy.add_argument("--instance-type", help=f"default: {DEFAULT_HOSTING_INSTANCE}, or 'local' with --local")
    deploy.add_argument("--instance-count", type=int, default=1, help="initial instances (default: %(default)s)")
    scaling = deploy.add_argument_group("autoscaling (real-time endpoints in AWS)")
    scaling.add_argument("--max-instances", type=int, help="turn on target tracking up to this many instances")
    scaling.add_argument("--min-instances", type=int, help="default: --instance-count (0 with --async)")
    scaling.add_argument("--target-invocations", type=float, default=100.0,
                         help="invocations per instance per minute to aim for (default: %(default)s)")
    scaling.add_argument("--scale-in-cooldown", type=int, default=300, help="seconds (default: %(default)s)")
    scaling.add_argument("--scale-out-cooldown", type=int, default=60, help="seconds (default: %(default)s)")
    serverless = deploy.add_argument_group("serverless")
    serverless.add_argument("--serverless", action="store_true", help="a serverless endpoint instead of instances")
    serverless.add_argument("--memory-mb", type=int, default=3072, choices=(1024, 2048, 3072, 4096, 5120, 6144))
    serverless.add_argument("--max-concurrency", type=int, default=5)
    asynchronous = deploy.add_argument_group("asynchronous inference (AWS)")
    asynchronous.add_argument("--async", dest="asynchronous", action="store_true",
                              help="an asynchronous endpoint: requests name an S3 input of up to 1 GB, answers "
                                   "land in --async-output-path; with --max-instances it scales on its backlog, "
                                   "down to zero instances by default")
    asynchronous.add_argument("--async-output-path", help="s3:// prefix for the answers (required with --async)")
    asynchronous.add_argument("--async-failure-path", help="s3:// prefix for failed requests' errors")
    asynchronous.add_argument("--success-topic", help="SNS topic ARN told of each answer")
    asynchronous.add_argument("--error-topic", help="SNS topic ARN told of each failure")
    asynchronous.add_argument("--max-concurrent-invocations", type=int,
                              help="requests in flight per instance (default: SageMaker's choice)")
    asynchronous.add_argument("--target-backlog", type=float, default=5.0,
                              help="with --max-instances: queued requests per instance to aim for "
                                   "(default: %(default)s)")
    multi = deploy.add_argument_group("multi-model (CPU instances in AWS)")
    multi.add_argument("--multi-model", action="store_true",
                       help="serve every model.tar.gz under --model-data (an S3 prefix ending in /); each request "
                            "names its model (predict --target-model); add models with add-model, no redeploy")
    capture = deploy.add_argument_group("data capture")
    capture.add_argument("--capture-s3-uri", help="capture requests and responses to this S3 prefix")
    capture.add_argument("--capture-percent", type=int, default=100, help="sampling percentage (default: 100)")
    deploy.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="wait until the endpoint is InService (needed for autoscaling; default: wait)")

    transform = commands.add_parser("transform", parents=[_common(local=False)], help="run a Batch Transform job",
                                    description="Classify every image under an S3 prefix; one JSON file per "
                                                "image (<name>.out) under --output-path.")
    _model(transform, local=False)
    transform.add_argument("--data", required=True, help="s3:// prefix of the images")
    transform.add_argument("--output-path", required=True, help="s3:// prefix for the answers")
    transform.add_argument("--instance-type", default=DEFAULT_HOSTING_INSTANCE)
    transform.add_argument("--instance-count", type=int, default=1)
    transform.add_argument("--max-payload-mb", type=int, default=6, help="largest image (default: %(default)s)")
    transform.add_argument("--max-concurrent-transforms", type=int, help="requests in flight per instance")
    transform.add_argument("--job-name")
    transform.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True)

    predict = commands.add_parser("predict", parents=[_common(local=True)], help="classify local images",
                                  description="Send image files to an endpoint and print the top label of each "
                                              "(classifier-predict does more: top-k, CSV/JSON, concurrency).")
    predict.add_argument("--endpoint-name", required=True, help="with --local any name reaches the local endpoint")
    predict.add_argument("--target-model", help="on a multi-model endpoint: the model's path under its prefix "
                                                "(e.g. dogs.tar.gz)")
    predict.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or globs")

    delete = commands.add_parser("delete", parents=[_common(local=True)],
                                 help="delete an endpoint, its config, models and scaling",
                                 description="Delete the scaling target and policy, endpoint, endpoint config "
                                             "and models; whatever is already gone is skipped.")
    delete.add_argument("--endpoint-name", required=True)

    prefix_help = "the multi-model endpoint's S3 prefix (s3://bucket/models/)"
    add_model = commands.add_parser("add-model", parents=[_common(local=False)],
                                    help="put a model where a multi-model endpoint finds it",
                                    description="Copy a model.tar.gz (a local file, an S3 URI or a training job's "
                                                "artifact) to <prefix><name>. The endpoint loads it on the first "
                                                "request that names it: no redeploy.")
    add_model.add_argument("--model-data-prefix", required=True, help=prefix_help)
    source = add_model.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-data", help="model.tar.gz: a local file or s3://")
    source.add_argument("--training-job", help="the artifact of this finished training job")
    add_model.add_argument("--name", help="its name on the endpoint, ending in .tar.gz (default: the local "
                                          "file's name; required for S3 sources, which are all model.tar.gz)")
    list_models = commands.add_parser("list-models", parents=[_common(local=False)],
                                      help="the models a multi-model endpoint can serve",
                                      description="Every .tar.gz under the prefix: the names predict "
                                                  "--target-model takes.")
    list_models.add_argument("--model-data-prefix", required=True, help=prefix_help)
    check.add_parser(commands)
    package.add_parser(commands)
    return parser


# --- the commands ----------------------------------------------------------------------------


def make_session(args: argparse.Namespace, boto_session: boto3.Session | None,
                 environ: Mapping[str, str]) -> session.SageMaker:
    boto_session = boto_session or boto3.Session(region_name=args.region)
    if getattr(args, "local", False):
        return session.local(boto_session, port=args.port, container_root=args.container_root)
    for path in session.sdk_config_files(environ):
        print(f"warning: {path} (SageMaker SDK defaults) is not read by this CLI: pass its settings as flags "
              "(--subnets, --security-group-ids, --kms-key, --tag, --role, --output-path)", file=sys.stderr)
    return session.aws(boto_session)


def resolve_role(args: argparse.Namespace, environ: Mapping[str, str],
                 sagemaker: session.SageMaker | None = None) -> str:
    """The execution role's ARN; a role name is looked up in IAM (in AWS)."""
    role = args.role or environ.get(ROLE_ENV)
    if role and (role.startswith("arn:") or getattr(args, "local", False) or sagemaker is None):
        return role
    if role:
        assert sagemaker is not None
        return sagemaker.client("iam").get_role(RoleName=role)["Role"]["Arn"]
    if getattr(args, "local", False):
        return session.LOCAL_ROLE
    raise UsageError(f"--role (or ${ROLE_ENV}) is required: the execution role SageMaker runs the job with")


def security_from_args(args: argparse.Namespace) -> training.Security:
    local = getattr(args, "local", False)
    given = args.subnets or args.security_group_ids or args.kms_key or args.network_isolation or \
        args.encrypt_inter_container_traffic or args.tag
    if local and given:
        raise UsageError("--subnets, --security-group-ids, --kms-key, --network-isolation, "
                         "--encrypt-inter-container-traffic and --tag are for AWS, not --local")
    try:
        return training.Security(args.subnets, args.security_group_ids, args.kms_key, args.network_isolation,
                                 args.encrypt_inter_container_traffic, dict(args.tag))
    except ValueError as error:
        raise UsageError(str(error)) from None


def job_spec(args: argparse.Namespace, role: str) -> training.JobSpec:
    local = getattr(args, "local", False)
    if local and not args.output_path:
        raise UsageError("--local needs --output-path file://... (local mode has no default bucket without AWS)")
    spot = getattr(args, "spot", False)
    if local and (spot or args.checkpoint_s3_uri):
        raise UsageError("--spot and --checkpoint-s3-uri are for AWS; local mode runs on this machine")
    if spot and not args.checkpoint_s3_uri:
        raise UsageError("--spot needs --checkpoint-s3-uri: without checkpoints an interrupted job starts over")
    return training.JobSpec(
        image_uri=args.image_uri, role=role,
        instance_type=args.instance_type or ("local" if local else DEFAULT_TRAINING_INSTANCE),
        instance_count=args.instance_count, hyperparameters=dict(args.hp), output_path=args.output_path,
        max_run_s=args.max_run, spot=spot, max_wait_s=getattr(args, "max_wait", None),
        checkpoint_s3_uri=args.checkpoint_s3_uri, volume_size_gb=args.volume_size, input_mode=args.input_mode,
        base_job_name=args.base_job_name, security=security_from_args(args),
    )


def channels(args: argparse.Namespace) -> training.Channels:
    return training.Channels(args.data, args.validation, args.test)


def cmd_train(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    result = training.train(job_spec(args, resolve_role(args, environ, sagemaker)), channels(args), sagemaker,
                            wait=args.wait, job_name=args.job_name)
    print(f"training job: {result.job_name}")
    print(f"status: {result.status}")
    if result.failure_reason:
        print(f"reason: {result.failure_reason}")
    if result.status in ("Failed", "Stopped"):
        return 1
    print(f"model artifact: {result.model_data}")
    return 0


def cmd_tune(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    tuning = training.TuningSpec(
        learning_rate=(args.lr_min, args.lr_max), batch_sizes=tuple(args.batch_sizes), max_jobs=args.max_jobs,
        max_parallel_jobs=args.max_parallel_jobs, strategy=args.strategy, early_stopping=args.early_stopping,
    )
    result = training.tune(job_spec(args, resolve_role(args, environ, sagemaker)), tuning, channels(args), sagemaker,
                           wait=args.wait, job_name=args.job_name)
    print(f"tuning job: {result.job_name}")
    print(f"objective: {training.OBJECTIVE_METRIC} (Maximize)")
    print(f"status: {result.status}")
    if result.failure_reason:
        print(f"reason: {result.failure_reason}")
    if result.best_training_job:
        print(f"best training job: {result.best_training_job} (deploy --training-job {result.best_training_job})")
    return 1 if result.status in ("Failed", "Stopped") else 0


def model_from_args(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str],
                    base_name: str) -> hosting.ModelSpec:
    model_data = args.model_data or hosting.model_data_of(sagemaker, args.training_job)
    return hosting.ModelSpec(image_uri=args.image_uri, model_data=model_data, role=resolve_role(args, environ, sagemaker),
                             name=args.model_name or session.timestamped(base_name), env=dict(args.env),
                             security=security_from_args(args))


def scaling_from_args(args: argparse.Namespace) -> hosting.Autoscaling | hosting.BacklogScaling | None:
    if args.max_instances is None:
        if args.min_instances is not None:
            raise UsageError("--min-instances needs --max-instances")
        return None
    if args.local or args.serverless:
        raise UsageError("autoscaling is for instance-backed endpoints in AWS (not --local or --serverless)")
    if not args.wait:
        raise UsageError("autoscaling needs the endpoint InService first: drop --no-wait")
    try:  # the bounds are checked here, before anything is created
        if args.asynchronous:
            minimum = args.min_instances if args.min_instances is not None else 0
            return hosting.BacklogScaling(minimum, args.max_instances, args.target_backlog,
                                          args.scale_in_cooldown, args.scale_out_cooldown)
        minimum = args.min_instances if args.min_instances is not None else args.instance_count
        return hosting.Autoscaling(minimum, args.max_instances, args.target_invocations,
                                   args.scale_in_cooldown, args.scale_out_cooldown)
    except ValueError as error:
        raise UsageError(str(error)) from None


ASYNC_ONLY = ("async_output_path", "async_failure_path", "success_topic", "error_topic",
              "max_concurrent_invocations")


def asynchronous_from_args(args: argparse.Namespace) -> hosting.Asynchronous | None:
    if not args.asynchronous:
        given = [f"--{name.replace('_', '-')}" for name in ASYNC_ONLY if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --async")
        return None
    if args.local or args.serverless or args.multi_model:
        raise UsageError("--async is for instance-backed endpoints in AWS (not --local, --serverless or "
                         "--multi-model)")
    if not (args.async_output_path or "").startswith("s3://"):
        raise UsageError("--async needs --async-output-path s3://bucket/prefix/ (where the answers go)")
    if args.async_failure_path is not None and not args.async_failure_path.startswith("s3://"):
        raise UsageError(f"--async-failure-path must be an s3:// prefix, not {args.async_failure_path!r}")
    if args.max_concurrent_invocations is not None and args.max_concurrent_invocations < 1:
        raise UsageError("--max-concurrent-invocations must be at least 1")
    return hosting.Asynchronous(args.async_output_path, args.async_failure_path, args.success_topic,
                                args.error_topic, args.max_concurrent_invocations)


def multi_model_from_args(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str],
                          endpoint_name: str) -> hosting.ModelSpec:
    if args.local:
        raise UsageError("--multi-model is for AWS: locally, run the image with SAGEMAKER_MULTI_MODEL=true "
                         "(README, multi-model endpoints)")
    if args.serverless:
        raise UsageError("--multi-model needs instances: serverless endpoints serve one model")
    if args.training_job:
        raise UsageError("--multi-model takes --model-data s3://bucket/models/ (the prefix); put a training "
                         "job's artifact there with add-model --training-job")
    instance_type = args.instance_type or DEFAULT_HOSTING_INSTANCE
    if instance_type.startswith(GPU_INSTANCE_FAMILIES):
        raise UsageError(f"--multi-model runs on CPU instances: SageMaker hosts multi-model endpoints on GPU "
                         f"and accelerator instances ({instance_type}) only with its own containers (Triton)")
    return hosting.ModelSpec(image_uri=args.image_uri, model_data=args.model_data,
                             role=resolve_role(args, environ, sagemaker),
                             name=args.model_name or session.timestamped(endpoint_name), env=dict(args.env),
                             multi_model=True, security=security_from_args(args))


def cmd_deploy(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    if args.local and (args.serverless or args.capture_s3_uri):
        raise UsageError("--serverless and --capture-s3-uri are for AWS endpoints, not --local")
    asynchronous = asynchronous_from_args(args)
    scaling = scaling_from_args(args)
    name = args.endpoint_name or default_name("image-classifier")
    if asynchronous:  # the server then takes the larger, slower requests an async endpoint sends
        args.env = [("CLASSIFIER_ASYNC", "true"), *args.env]
    if args.multi_model:
        model = multi_model_from_args(args, sagemaker, environ, name)
    else:
        model = model_from_args(args, sagemaker, environ, base_name=name)
    model_name = hosting.create_model(sagemaker, model)
    try:
        hosting.deploy(
            sagemaker, model_name, endpoint_name=name,
            instance_type=args.instance_type or ("local" if args.local else DEFAULT_HOSTING_INSTANCE),
            instance_count=args.instance_count,
            serverless=hosting.Serverless(args.memory_mb, args.max_concurrency) if args.serverless else None,
            asynchronous=asynchronous, capture_s3_uri=args.capture_s3_uri, capture_percent=args.capture_percent,
            wait=args.wait, security=model.security,
        )
    except (ClientError, BotoCoreError) as error:
        # Nothing refers to the model until the endpoint exists: do not leave it behind.
        if not _exists(sagemaker.sagemaker.describe_endpoint, EndpointName=name):
            for call, arguments in ((sagemaker.sagemaker.delete_endpoint_config, {"EndpointConfigName": name}),
                                    (sagemaker.sagemaker.delete_model, {"ModelName": model_name})):
                try:
                    call(**arguments)
                except ClientError:
                    pass
        raise error
    print(f"endpoint: {name}")
    if args.multi_model:
        print(f"models: every .tar.gz under {args.model_data} (predict --target-model NAME)")
    if asynchronous:
        print(f"answers: {asynchronous.output_path}")
    if isinstance(scaling, hosting.BacklogScaling):
        policies = hosting.configure_backlog_scaling(sagemaker.client("application-autoscaling"),
                                                     sagemaker.client("cloudwatch"), name, scaling)
        print(f"autoscaling: {scaling.min_instances}..{scaling.max_instances} instances, "
              f"{scaling.target_backlog:g} queued requests/instance (policies {', '.join(policies)})")
    elif scaling:
        policy = hosting.configure_autoscaling(sagemaker.client("application-autoscaling"), name, scaling)
        print(f"autoscaling: {scaling.min_instances}..{scaling.max_instances} instances, "
              f"{scaling.target_invocations:g} invocations/instance/minute (policy {policy})")
    if args.local:
        serve_until_interrupted(sagemaker, name, args.port)
    return 0


def _exists(describe: Any, **arguments: str) -> bool:
    try:
        describe(**arguments)
    except ClientError:
        return False
    return True


def serve_until_interrupted(sagemaker: session.SageMaker, endpoint_name: str, port: int) -> None:
    """Keep this process (which owns the local endpoint) alive until Ctrl-C/SIGTERM, then delete it."""
    print(f"local endpoint on http://localhost:{port} (POST /invocations); Ctrl-C deletes it", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Set both explicitly: a shell starts background jobs with SIGINT ignored.
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Bounded by the container's life: stop waiting when it stops answering.
        while hosting.local_endpoint_answers(port):
            time.sleep(LOCAL_POLL_S)
        print("the local endpoint stopped answering", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for what in hosting.delete(sagemaker, endpoint_name):
            print(f"deleted {what}")


def cmd_transform(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    job_name = args.job_name or session.timestamped("image-classifier-transform")
    spec = model_from_args(args, sagemaker, environ, base_name=job_name)
    model = hosting.create_model(sagemaker, spec)
    name = batch.transform(
        sagemaker, model, data=args.data, output_path=args.output_path, instance_type=args.instance_type,
        instance_count=args.instance_count, max_payload_mb=args.max_payload_mb,
        max_concurrent_transforms=args.max_concurrent_transforms, job_name=job_name, wait=args.wait,
        security=spec.security,
    )
    print(f"transform job: {name}")
    print(f"output: {args.output_path}")
    return 0


def cmd_predict(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    """The same path as classifier-predict --endpoint: one table, the skipped files on stderr."""
    if args.target_model is not None:
        hosting.check_target_model(args.target_model)
    client = predict.EndpointClient(sagemaker.runtime, args.endpoint_name, target_model=args.target_model,
                                    top_k=None, profile=environ.get("AWS_PROFILE"))
    return predict.run(client, args.paths, prog=f"{PROG} predict")


def cmd_add_model(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    source = args.model_data or hosting.model_data_of(sagemaker, args.training_job)
    name = args.name
    if name is None:
        if source.startswith("s3://"):
            raise UsageError("--name is required for an S3 source or a training job (their artifacts are all "
                             "model.tar.gz): e.g. --name dogs.tar.gz")
        name = os.path.basename(source)
    uri = hosting.add_model(sagemaker, args.model_data_prefix, source, name)
    print(f"model: {uri}")
    print(f"target model: {name}")
    return 0


def cmd_list_models(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    names = hosting.list_models(sagemaker, args.model_data_prefix)
    for name in names:
        print(name)
    if not names:
        print(f"no models under {args.model_data_prefix}", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace, sagemaker: session.SageMaker, environ: Mapping[str, str]) -> int:
    autoscaling = None if args.local else sagemaker.client("application-autoscaling")
    cloudwatch = None if args.local else sagemaker.client("cloudwatch")
    deleted = hosting.delete(sagemaker, args.endpoint_name, autoscaling, cloudwatch)
    for what in deleted:
        print(f"deleted {what}")
    if not deleted:
        print(f"nothing to delete for endpoint {args.endpoint_name}")
    return 0


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "deploy": cmd_deploy, "transform": cmd_transform,
            "predict": cmd_predict, "delete": cmd_delete, "add-model": cmd_add_model,
            "list-models": cmd_list_models, "check": check.cmd_check, "package": package.cmd_package}


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] = os.environ,
         boto_session: boto3.Session | None = None) -> int:
    """Run one subcommand; ``boto_session`` replaces the default AWS configuration (tests pass one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # The SDK's config loader logs each config file it does (not) find at INFO on its own handler.
    logging.getLogger("sagemaker.config").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        # check needs Docker only, package only this machine: no AWS session (and no region) for them.
        sagemaker = None if args.command in ("check", "package") else make_session(args, boto_session, environ)
        return COMMANDS[args.command](args, sagemaker, environ)
    except UsageError as error:
        parser.error(f"{args.command}: {error}")  # exits 2
    except (ValueError, RuntimeError, BotoCoreError, ClientError) as error:
        # What AWS or the SDK refused (bad values, a failed job, missing region or credentials).
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 2
