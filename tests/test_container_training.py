"""The real image as SageMaker runs training jobs: several hosts, and spot interruptions."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch

from classifier import artifact

from containers import docker, image_for, write_training_config
from imagedata import write_image_folder

pytestmark = pytest.mark.container
HOSTS = ("algo-1", "algo-2")
FAST = {"architecture": "resnet18", "pretrained": "false", "image_size": "32", "batch_size": "8",
        "workers": "0", "seed": "5"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_image_folder(root / "training", 16, seed=21)
    write_image_folder(root / "validation", 4, seed=22)
    return root


def opt_ml(base: Path, dataset: Path, hyperparameters: dict[str, str], **hosts) -> Path:
    for channel in ("training", "validation"):
        shutil.copytree(dataset / channel, base / "input" / "data" / channel)
    write_training_config(base, hyperparameters, ["training", "validation"], **hosts)
    return base


def wait_exit(container: str, timeout_s: float) -> int:
    result = docker("wait", container, timeout=timeout_s)
    return int(result.stdout.strip())


@pytest.fixture
def network():
    name = f"classifier-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    containers: list[str] = []
    yield name, containers
    for container in containers:
        docker("rm", "-f", container, check=False)
    docker("network", "rm", name, check=False)


def start_host(image: str, network: str, host: str, base: Path, containers: list[str]) -> str:
    name = f"{network}-{host}"
    containers.append(name)
    docker("run", "-d", "--name", name, "--hostname", host, "--network", network, "--network-alias", host,
           "-v", f"{base}:/opt/ml", image, "train")
    return name


def test_two_hosts_train_together_and_write_one_artifact(dataset: Path, tmp_path: Path, network) -> None:
    net, containers = network
    image = image_for("cpu")
    started = {
        host: start_host(image, net, host, opt_ml(tmp_path / host, dataset, {**FAST, "epochs": "2"},
                                                 current_host=host, hosts=HOSTS), containers)
        for host in reversed(HOSTS)  # the second host first: it must wait for the first
    }
    codes = {host: wait_exit(container, 600) for host, container in started.items()}
    logs = {host: docker("logs", container).stderr for host, container in started.items()}
    assert codes == {"algo-1": 0, "algo-2": 0}, logs
    assert "rank 0 of 2" in logs["algo-1"] and "rank 1 of 2" in logs["algo-2"]
    assert artifact.is_artifact(tmp_path / "algo-1" / "model")
    assert not list((tmp_path / "algo-2" / "model").glob("*")), "only rank 0 writes the model"


def test_a_peer_that_never_shows_up_fails_the_job_with_a_reason(dataset: Path, tmp_path: Path, network) -> None:
    net, containers = network
    base = opt_ml(tmp_path / "algo-1", dataset, {**FAST, "peer_timeout_s": "10"}, current_host="algo-1", hosts=HOSTS)
    container = start_host(image_for("cpu"), net, "algo-1", base, containers)
    assert wait_exit(container, 120) != 0
    reason = (base / "output" / "failure").read_text()
    assert "could not form the process group of 2" in reason
    assert "1/2 clients joined" in reason


def test_docker_stop_checkpoints_and_a_restart_resumes_to_the_same_weights(dataset: Path, tmp_path: Path) -> None:
    """`docker stop` is how SageMaker stops a job (SIGTERM, SIGKILL after 120 s)."""
    image = image_for("cpu")
    hyperparameters = {**FAST, "epochs": "3", "checkpoint_steps": "2"}
    reference = opt_ml(tmp_path / "reference", dataset, hyperparameters)
    run = docker("run", "--rm", "-v", f"{reference}:/opt/ml", image, "train", check=False)
    assert run.returncode == 0, run.stderr[-3000:]

    base = opt_ml(tmp_path / "spot", dataset, hyperparameters)
    name = f"classifier-spot-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "-v", f"{base}:/opt/ml", image, "train")
    try:
        deadline = time.monotonic() + 300
        while not list((base / "checkpoints").glob("checkpoint-*.pt")):
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        docker("stop", "-t", "120", name, timeout=180)
        assert int(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout) == 143
        assert "run again to resume" in docker("logs", name).stderr
    finally:
        docker("rm", "-f", name, check=False)
    assert not artifact.is_artifact(base / "model")

    resumed = docker("run", "--rm", "-v", f"{base}:/opt/ml", image, "train", check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    expected = safetensors.torch.load_file(str(reference / "model" / artifact.WEIGHTS_FILE))
    actual = safetensors.torch.load_file(str(base / "model" / artifact.WEIGHTS_FILE))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


# Docker's defaults, as `docker run` and SageMaker's local mode give them: 64 MB of /dev/shm.
# Default settings otherwise (224-pixel inputs, batches of 64, one loader worker per core), with
# the hyperparameters a user sets arriving as strings.
USER_HYPERPARAMETERS = {"epochs": "1", "batch_size": "64", "learning_rate": "0.01"}


@pytest.fixture(scope="module")
def default_sized_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images for several default-sized batches in flight at once."""
    root = tmp_path_factory.mktemp("shapes-224")
    write_image_folder(root / "training", 70, seed=31)
    write_image_folder(root / "validation", 4, seed=32)
    return root


def test_trains_with_dockers_default_shared_memory_and_default_settings(default_sized_dataset: Path,
                                                                        tmp_path: Path) -> None:
    base = opt_ml(tmp_path / "ml", default_sized_dataset, USER_HYPERPARAMETERS)
    run = docker("run", "--rm", "-v", f"{base}:/opt/ml", image_for("cpu"), "train", check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pass batches through pipes: /dev/shm has 64 MB free" in run.stderr
    assert artifact.is_artifact(base / "model")


def test_two_hosts_train_with_dockers_default_shared_memory(default_sized_dataset: Path, tmp_path: Path,
                                                            network) -> None:
    net, containers = network
    started = {
        host: start_host(image_for("cpu"), net, host,
                         opt_ml(tmp_path / host, default_sized_dataset, USER_HYPERPARAMETERS,
                                current_host=host, hosts=HOSTS), containers)
        for host in HOSTS
    }
    codes = {host: wait_exit(container, 900) for host, container in started.items()}
    logs = {host: docker("logs", container).stderr[-3000:] for host, container in started.items()}
    assert codes == {"algo-1": 0, "algo-2": 0}, logs
    assert artifact.is_artifact(tmp_path / "algo-1" / "model")
