"""The user's own code in the real image, through SageMaker Python SDK v3's local mode.

The same user code as test_bring_your_own.py (``tests/user_code/shapes``), driven by v3's API:

    ModelTrainer(training_image=IMAGE, source_code=SourceCode(...), training_mode=Mode.LOCAL_CONTAINER).train(...)
    ModelBuilder(model_path=<model + code/>, image_uri=IMAGE, model_server=ModelServer.TORCHSERVE,
                 mode=Mode.LOCAL_CONTAINER, ...).deploy().invoke(...)

v3 cannot be installed beside v2 (which deploy/ and the other SDK tests use), so it gets its own
environment, ``.venv-sdk-v3`` at the repository root, built from requirements/sdk-v3.txt on first use
and reused while that file is unchanged. The SDK calls live in tests/sdk_v3/run_v3.py, which that
environment runs; these tests make the data, run its steps and check what they wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_process import Background, train_argv

from deploy.package import write_tarball

from artifacts import constant_artifact
from containers import docker, image_for
from imagedata import CLASSES, write_image_folder
from ports import free_port
from sdk_local import compose_containers, running

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements" / "sdk-v3.txt"
VENV = ROOT / ".venv-sdk-v3"
RUN_V3 = Path(__file__).parent / "sdk_v3" / "run_v3.py"
USER_CODE = Path(__file__).parent / "user_code" / "shapes"
STEP_LIMIT_S = 240  # run_v3.py's own limit; the subprocess gets a margin on top for its cleanup
# The built-in trainer, small: a CLI run proves the path, not the learning (test_local_mode.py does).
CLI_TRAINING = {"epochs": "1", "architecture": "resnet18", "pretrained": "false", "image_size": "32",
                "batch_size": "8"}


@pytest.fixture(scope="module")
def image() -> str:
    return image_for("cpu")  # before the environment: a suite without images skips without building it


@pytest.fixture(scope="module")
def v3_python(image: str) -> Path:
    """``.venv-sdk-v3/bin/python``, installed from requirements/sdk-v3.txt unless the stamp says it is current."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not (stamp.is_file() and stamp.read_text().strip() == want):
        started = time.monotonic()
        if not python.exists():
            # The interpreter the suite runs on (run.sh's PYTHON): a venv made from a venv uses its base.
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=900)
        assert install.returncode == 0, install.stderr[-4000:]
        stamp.write_text(f"{want}\n")
        print(f"{VENV.name}: installed in {time.monotonic() - started:.0f} s")
    return python


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The steps' folders; containers a step left behind (it was killed) are removed after the module."""
    root = tmp_path_factory.mktemp("sdk-v3")
    yield root
    leftovers = compose_containers(root)
    if leftovers:
        docker("rm", "-f", *leftovers, check=False)


def run_step(python: Path, step: str, work: Path, *args: str) -> tuple[dict, str]:
    """run_v3.py ``step`` with its output in ``work``: (result.json, the step's log)."""
    started = time.monotonic()
    completed = subprocess.run([str(python), str(RUN_V3), step, "--work", str(work), "--code", str(USER_CODE),
                                "--limit-s", str(STEP_LIMIT_S), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=STEP_LIMIT_S + 120)
    log = completed.stdout
    print(f"run_v3.py {step}: {time.monotonic() - started:.1f} s")
    assert (work / "result.json").is_file(), log[-6000:]
    result = json.loads((work / "result.json").read_text())
    assert completed.returncode == 0 and result["ok"], f"{result.get('error')}\n{log[-6000:]}"
    assert result["refused_lookups"] == [], result  # nothing but loopback: no AWS account, no registry
    return result, log


def tar_names(path: str) -> set[str]:
    with tarfile.open(path) as archive:
        return {name.removeprefix("./") for name in archive.getnames()} - {"", "."}


@pytest.fixture(scope="module")
def trained(v3_python: Path, image: str, work: Path) -> tuple[dict, str]:
    data = write_image_folder(work / "train-data", 30, seed=1)
    return run_step(v3_python, "train", work / "train", "--image", image, "--data", str(data),
                    "--hyperparameters", json.dumps({"epochs": 8, "batch-size": 16, "lr": 0.01}))


def test_model_trainer_runs_a_users_script_in_the_image(trained: tuple[dict, str]) -> None:
    result, log = trained
    assert "rank 0 of 1 on algo-1" in log, log[-4000:]
    assert {"model.pth", "classes.json"} <= tar_names(result["model_tar"])
    with tarfile.open(result["output_tar"]) as archive:
        summary = archive.extractfile("data/summary.txt")
        assert summary is not None and summary.read().decode() == "trained on 720 images\n"


def test_model_trainer_runs_a_users_script_on_two_instances_with_torchrun(v3_python: Path, image: str,
                                                                         work: Path) -> None:
    data = write_image_folder(work / "ddp-data", 12, seed=5)
    result, log = run_step(v3_python, "train-ddp", work / "train-ddp", "--image", image, "--data", str(data),
                           "--hyperparameters", json.dumps({"epochs": 1, "batch-size": 8}))
    # v3's torchrun driver: one process per host, node rank = host index.
    assert set(re.findall(r"rank ([01]) of 2 on (algo-\d)", log)) == {("0", "algo-1"), ("1", "algo-2")}, log[-6000:]
    assert {"model.pth", "classes.json"} <= tar_names(result["model_tar"])


def test_model_builder_serves_the_trained_model_through_the_users_inference_py(
        v3_python: Path, image: str, work: Path, trained: tuple[dict, str]) -> None:
    held_out = write_image_folder(work / "held-out", 6, seed=3)
    result, log = run_step(v3_python, "serve", work / "serve", "--image", image,
                           "--model-tar", trained[0]["model_tar"], "--images", str(held_out))
    answers = result["answers"]
    assert len(answers) == 18 and all(set(answer) == {"label", "probability"} for answer in answers.values()), answers
    correct = sum(answer["label"] == name.split("/")[0] for name, answer in answers.items())
    assert correct >= 0.8 * len(answers), answers  # chance is 1/3
    assert docker("ps", "-aq", "--filter", f"id={result['serving_container']}").stdout.strip() == "", log[-4000:]
    assert compose_containers(work / "serve") == []


# --- the deploy CLI with only SDK v3 installed -----------------------------------------------


def cli_env() -> dict[str, str]:
    """A region and no credentials, as local mode runs for a user without an AWS account."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    return {**env, "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1"}


def cli(python: Path, *argv: str, timeout_s: float = STEP_LIMIT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "deploy", *argv], cwd=ROOT, env=cli_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)


def test_the_deploy_cli_runs_on_sdk_v3_alone(v3_python: Path) -> None:
    check = subprocess.run([str(v3_python), "-c", "import importlib.util as u, deploy.session as s; "
                            "print(u.find_spec('sagemaker.local') is None, s.local_session_class().__module__)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.stdout.split() == ["True", "sagemaker.core.local.local_session"], check.stdout + check.stderr


@pytest.mark.parametrize("instances", [1, 2])
def test_the_deploy_cli_trains_in_local_mode_on_sdk_v3(v3_python: Path, image: str, work: Path,
                                                       instances: int) -> None:
    data = write_image_folder(work / f"cli-data-{instances}" / "train", 12, seed=41)
    output, root = work / f"cli-output-{instances}", work / f"cli-{instances}"
    result = cli(v3_python, *train_argv(image, data.parent, output, root, CLI_TRAINING),
                 "--instance-count", str(instances))
    assert result.returncode == 0, result.stdout[-6000:]
    assert f"model artifact: file://{output}/model.tar.gz" in result.stdout
    assert f"rank {instances - 1} of {instances}" in result.stdout, result.stdout[-6000:]
    assert {"manifest.json", "model.safetensors"} <= tar_names(str(output / "model.tar.gz"))
    assert running(compose_containers(root)) == []


def test_the_deploy_cli_serves_and_predicts_in_local_mode_on_sdk_v3(v3_python: Path, image: str, work: Path) -> None:
    """``deploy --local`` (serving until Ctrl-C), ``predict --local`` from another process, then
    Ctrl-C deletes the endpoint; the model answers "square" for every image."""
    tarball = work / "cli-model" / "model.tar.gz"
    write_tarball(constant_artifact(work / "cli-model" / "artifact", tuple(CLASSES), "square"), tarball)
    photos = write_image_folder(work / "cli-photos", 2, seed=42)
    port, root = free_port(), work / "cli-serve"
    server = Background(["deploy", "--local", "--port", str(port), "--container-root", str(root), "--image-uri", image,
                         "--model-data", f"file://{tarball}", "--endpoint-name", "v3-local"], cli_env(),
                        python=str(v3_python))
    try:
        server.wait_for("Ctrl-C deletes it", timeout_s=STEP_LIMIT_S)
        predicted = cli(v3_python, "predict", "--local", "--port", str(port), "--endpoint-name", "v3-local",
                        str(photos))
        assert predicted.returncode == 0, predicted.stdout[-4000:]
        rows = re.findall(r"^(\S+\.png)\s+(\S+)\s+([0-9.]+)", predicted.stdout, re.MULTILINE)
        assert len(rows) == 2 * len(CLASSES) and {label for _, label, _ in rows} == {"square"}, predicted.stdout
    finally:
        server.process.send_signal(signal.SIGINT)
        code = server.finish(timeout_s=120)
    assert code == 0, server.output
    assert "deleted endpoint v3-local" in server.output and "deleted model v3-local" in server.output, server.output
    assert running(compose_containers(root)) == []
