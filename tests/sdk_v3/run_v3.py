"""SageMaker Python SDK v3 local mode against the image: the steps tests/test_sdk_v3.py checks.

Run by the SDK v3 environment's interpreter (``.venv-sdk-v3``, requirements/sdk-v3.txt), never
imported by pytest: v3 cannot be installed beside the v2 SDK the rest of the suite uses.

    .venv-sdk-v3/bin/python tests/sdk_v3/run_v3.py train     --image IMAGE --work DIR --code DIR --data DIR
    .venv-sdk-v3/bin/python tests/sdk_v3/run_v3.py train-ddp --image IMAGE --work DIR --code DIR --data DIR
    .venv-sdk-v3/bin/python tests/sdk_v3/run_v3.py serve     --image IMAGE --work DIR --code DIR \\
        --model-tar model.tar.gz --images DIR

train       ModelTrainer + SourceCode(train.py) in one local container
train-ddp   the same on two local containers with distributed=Torchrun()
serve       ModelBuilder over <model>/code/inference.py, ModelServer.TORCHSERVE, Mode.LOCAL_CONTAINER;
            every PNG under --images is sent to the endpoint and its JSON answer recorded

Everything a step writes goes under --work (which must be new or empty), including the SDK's
compose folders. It ends with <work>/result.json: ``ok``, ``error``, ``seconds``, the artifacts'
paths (training) or the answers (serving), and ``refused_lookups``. It runs offline: no AWS
credentials, and every name lookup except loopback is refused and recorded. A step is bounded by
--limit-s; the containers it started are removed whatever happens. Exit status 0 when ``ok``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# An ARN, not a name: a role name is resolved through IAM (GetRole) even in local mode.
ROLE = "arn:aws:iam::111111111111:role/SageMakerRole"
# ModelBuilder.build() asks STS for the account to name a default bucket unless it is given an S3
# location (model_builder_utils._get_serve_setting), local mode or not. Nothing is uploaded there.
UNUSED_S3 = "s3://unused-in-local-mode/model/"
SERVING_PORT = 8080  # v3 local serving always publishes the container's 8080 on the same host port
LOOPBACK = ("localhost", "0.0.0.0", "::1")


class StepTimeout(BaseException):
    """The step ran past --limit-s. A BaseException, so that the SDK's ``except Exception`` retry
    loops (the serving deep ping) cannot swallow it. Its telemetry wrapper around train() and
    deploy() still can (it ends in ``finally: return response``): run_step also notes the alarm."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("step", choices=("train", "train-ddp", "serve"))
    parser.add_argument("--image", required=True, help="the image under test (present on this machine)")
    parser.add_argument("--work", type=Path, required=True, help="where the step writes everything")
    parser.add_argument("--code", type=Path, required=True, help="the user's train.py / inference.py folder")
    parser.add_argument("--data", type=Path, help="training: the 'training' channel")
    parser.add_argument("--hyperparameters", type=json.loads, default={}, help="training: a JSON object")
    parser.add_argument("--model-tar", type=Path, help="serve: model.tar.gz from a training step")
    parser.add_argument("--images", type=Path, help="serve: folder of PNGs to classify")
    parser.add_argument("--limit-s", type=int, default=300)
    args = parser.parse_args(argv)
    for name in ("work", "code", "data", "model_tar", "images"):  # the SDK mounts these into containers
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    needed = ("data",) if args.step.startswith("train") else ("model_tar", "images")
    for name in needed:
        if getattr(args, name) is None:
            parser.error(f"{args.step} needs --{name.replace('_', '-')}")
    return args


def go_offline(work: Path) -> list[str]:
    """A region and nothing else: no credentials, no profiles, no instance metadata, no telemetry.
    Sets ``os.environ`` because the SDK reads it. Returns the list refused lookups are added to."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        del os.environ[name]
    config = work / "sdk-config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    os.environ.update({
        "AWS_DEFAULT_REGION": "us-east-1",  # importing sagemaker.serve creates a boto3 client
        "AWS_CONFIG_FILE": str(work / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
        # ModelBuilder otherwise checks the role's permissions through IAM (iam_role_resolver).
        "SAGEMAKER_VALIDATE_ROLE": "false",
    })
    # LocalEndpoint.create starts a second, compose-run serving container in tempfile.mkdtemp():
    # keep it under --work, where the cleanup looks.
    tempfile.tempdir = str(work / "tmp")
    os.makedirs(tempfile.tempdir, exist_ok=True)

    refused: list[str] = []
    lookup = socket.getaddrinfo

    def loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK and not str(name).startswith("127."):
            refused.append(str(name))
            raise socket.gaierror(socket.EAI_NONAME, f"lookup of {name} refused: these steps run offline")
        return lookup(host, *args, **kwargs)

    socket.getaddrinfo = loopback_only
    return refused


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def compose_containers(root: Path) -> list[str]:
    """Containers started from compose files under ``root`` (training hosts, the second endpoint)."""
    listing = docker("ps", "-a", "--format", '{{.ID}} {{.Label "com.docker.compose.project.working_dir"}}').stdout
    return [line.split(" ", 1)[0] for line in listing.splitlines()
            if line.partition(" ")[2].startswith(f"{root}{os.sep}")]


def train(args: argparse.Namespace, instances: int) -> dict[str, Any]:
    from sagemaker.train.configs import Compute, InputData, SourceCode
    from sagemaker.train.distributed import Torchrun
    from sagemaker.train.model_trainer import Mode, ModelTrainer

    code = args.work / "code"  # the SDK mounts source_dir read-write: keep the container out of the original
    shutil.copytree(args.code, code)
    root = args.work / "sagemaker-local"  # a fresh root: the SDK never empties <root>/model between runs
    root.mkdir()
    trainer = ModelTrainer(
        training_image=args.image,
        source_code=SourceCode(source_dir=str(code), entry_script="train.py", requirements="requirements.txt"),
        compute=Compute(instance_type="local_cpu", instance_count=instances),
        distributed=Torchrun() if instances > 1 else None,
        hyperparameters=args.hyperparameters,
        training_mode=Mode.LOCAL_CONTAINER,
        local_container_root=str(root),
        base_job_name="shapes-v3",
        role=ROLE,
    )
    started = time.monotonic()
    trainer.train(input_data_config=[InputData(channel_name="training", data_source=str(args.data))], wait=True)
    artifacts = root / "compressed_artifacts"  # logged by the SDK, not returned by train()
    return {"seconds": {"train": round(time.monotonic() - started, 1)},
            "model_tar": str(artifacts / "model.tar.gz"), "output_tar": str(artifacts / "output.tar.gz")}


def pull_only_when_missing() -> None:
    """v3 local serving pulls the image before every deploy (LocalContainerMode._pull_image), even
    one that exists only on this machine: for ``sagemaker-classifier:…`` that asks Docker Hub, and
    fails. Keep the SDK's pull for images that are not here; skip it for those that are."""
    import docker as docker_sdk
    from sagemaker.serve.mode import local_container_mode

    always_pull = local_container_mode.LocalContainerMode._pull_image

    def _pull_image(self: Any, image: str) -> None:
        client = local_container_mode._get_docker_client()
        try:
            client.images.get(image)
        except docker_sdk.errors.ImageNotFound:
            always_pull(self, image)
            return
        self.client = client  # what the SDK's version leaves for starting the container

    local_container_mode.LocalContainerMode._pull_image = _pull_image


def payload_translators() -> tuple[Any, Any]:
    """PNG bytes in, JSON out. Without an input translator the SDK sends bytes as
    ``file-path/raw-bytes``, which the user's input_fn refuses."""
    from sagemaker.serve.marshalling.custom_payload_translator import CustomPayloadTranslator

    class PngIn(CustomPayloadTranslator):
        def serialize_payload_to_bytes(self, payload: object) -> bytes:
            return payload  # type: ignore[return-value]

        def deserialize_payload_from_stream(self, stream: Any) -> object:
            return stream.read()

    class JsonOut(CustomPayloadTranslator):
        def serialize_payload_to_bytes(self, payload: object) -> bytes:
            return json.dumps(payload).encode()

        def deserialize_payload_from_stream(self, stream: Any) -> object:
            return json.loads(stream.read())

    return PngIn("image/png", "application/json"), JsonOut("application/json", "application/json")


def model_with_code(model_tar: Path, code: Path, model: Path) -> Path:
    """The model as v2's PyTorchModel repack lays it out: the weights, and the user's code in code/.
    ModelBuilder(source_code=...) would do this through S3 even in local mode."""
    model.mkdir()
    with tarfile.open(model_tar) as archive:
        archive.extractall(model, filter="data")
    shutil.copytree(code, model / "code")
    return model


def serve(args: argparse.Namespace) -> dict[str, Any]:
    from sagemaker.serve import ModelBuilder, ModelServer
    from sagemaker.serve.builder.schema_builder import SchemaBuilder
    from sagemaker.serve.mode.function_pointers import Mode

    with socket.socket() as probe:  # fail now rather than after the SDK's 1200 s of deep pings
        try:
            probe.bind(("0.0.0.0", SERVING_PORT))
        except OSError as error:
            raise RuntimeError(f"host port {SERVING_PORT} is taken; v3 local serving always publishes it") from error
    pull_only_when_missing()
    model = model_with_code(args.model_tar, args.code, args.work / "model")
    images = sorted(args.images.rglob("*.png"))
    png_in, json_out = payload_translators()
    # The health check POSTs the sample input to /invocations (a "deep ping"): it must be a real image.
    schema = SchemaBuilder(images[0].read_bytes(), {"label": "circle", "probability": 0.9},
                           input_translator=png_in, output_translator=json_out)
    builder = ModelBuilder(model_path=str(model), image_uri=args.image, model_server=ModelServer.TORCHSERVE,
                           mode=Mode.LOCAL_CONTAINER, schema_builder=schema, role_arn=ROLE,
                           s3_model_data_url=UNUSED_S3)
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {"seconds": seconds}
    started = time.monotonic()
    try:
        builder.build()
        seconds["build"] = round(time.monotonic() - started, 1)
        endpoint = builder.deploy(endpoint_name="shapes-v3")
        if endpoint is None:  # deploy() was interrupted: the SDK's telemetry wrapper then returns None
            raise RuntimeError("deploy() returned no endpoint")
        seconds["deploy"] = round(time.monotonic() - started - seconds["build"], 1)
        try:
            answers = {}
            for path in images:
                response = endpoint.invoke(body=path.read_bytes(), content_type="image/png", accept="application/json")
                answers[path.relative_to(args.images).as_posix()] = json.loads(response.body.read())
            result["answers"] = answers
            seconds["invoke"] = round(time.monotonic() - started - seconds["build"] - seconds["deploy"], 1)
        finally:
            endpoint.delete()  # ends the local session's compose endpoint, not the serving container
    finally:
        # The serving container (docker-py, auto-removed once stopped) is held by the builder's mode.
        mode = getattr(builder, "modes", {}).get(str(Mode.LOCAL_CONTAINER))
        container = getattr(mode, "container", None)
        if container is not None:
            docker("rm", "-f", container.id)
            result["serving_container"] = container.id
    return result


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "train": lambda: train(args, instances=1),
        "train-ddp": lambda: train(args, instances=2),
        "serve": lambda: serve(args),
    }

    expired = f"StepTimeout: {args.step} ran past {args.limit_s} s"
    timed_out: list[bool] = []

    def past_limit(signum: int, frame: object) -> None:
        timed_out.append(True)
        raise StepTimeout(expired)

    signal.signal(signal.SIGALRM, past_limit)
    signal.alarm(args.limit_s)
    try:
        outcome = {"ok": True, **steps[args.step]()}
    except BaseException as error:  # noqa: BLE001 - recorded in result.json, which the test reads
        traceback.print_exc()
        outcome = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    finally:
        signal.alarm(0)
    if timed_out:  # even when the SDK swallowed it: its telemetry wrapper ends in `finally: return response`
        outcome.update(ok=False, error=expired)
    return outcome


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    refused = go_offline(args.work)
    started = time.monotonic()
    result = run_step(args)
    # Local mode stops its compose containers but never removes them.
    leftovers = compose_containers(args.work)
    if leftovers:
        docker("rm", "-f", *leftovers)
    result.update(step=args.step, step_s=round(time.monotonic() - started, 1), refused_lookups=sorted(set(refused)),
                  removed_compose_containers=len(leftovers))
    (args.work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
