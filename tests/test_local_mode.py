"""The real image under the SageMaker Python SDK's local mode, driven through the deploy CLI.

This is how users try a bring-your-own-container image before paying for AWS: ``instance_type``
``local``, ``file://`` data and outputs, a region and no credentials. Local mode runs
``docker compose`` with files it writes under ``--container-root``; containers are found (and
removed) afterwards by the compose working-directory label, which lies under that folder.
"""

from __future__ import annotations

import os
import re
import signal
import tarfile
import time
from pathlib import Path

import pytest
from cli_process import Background, train_argv

from deploy import hosting, training
from deploy.cli import main

from containers import docker, image_for
from imagedata import CLASSES, write_image_folder
from ports import free_port
from sdk_local import compose_containers, running

pytestmark = [
    pytest.mark.container,
    # SDK v2 local mode reads docker compose's output through a subprocess pipe it never closes
    # (sagemaker/local/image.py, _stream_output); CPython reports that as a ResourceWarning.
    pytest.mark.filterwarnings("ignore:unclosed file:ResourceWarning"),
]
# efficientnet_lite0 from the shipped ImageNet weights learns the shapes in a few epochs.
# Loader workers as a user gets them by default (one per core), in the 64 MB of /dev/shm that
# local mode gives its containers.
SINGLE_HOST = {"epochs": "5", "image_size": "64", "batch_size": "16", "learning_rate": "0.01"}
TWO_HOSTS = {"epochs": "2", "architecture": "resnet18", "pretrained": "false", "image_size": "32",
             "batch_size": "8"}


@pytest.fixture
def image() -> str:
    image = image_for("cpu")
    # Compose pulls an image it cannot find, from Docker Hub: fail here with a clearer reason.
    docker("image", "inspect", image)
    return image


def test_train_deploy_predict_delete_in_local_mode(image: str, no_credentials: None, container_root: Path,
                                                   tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_image_folder(data / "train", 30, seed=1)
    write_image_folder(data / "valid", 8, seed=2)
    write_image_folder(data / "test", 6, seed=4)
    held_out = write_image_folder(tmp_path / "held-out", 5, seed=3)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    output = tmp_path / "output"
    started, timings = time.monotonic(), {}

    # Train: one local container; the SDK streams the job's log to this process's stdout.
    code = main(train_argv(image, data, output, container_root, SINGLE_HOST, "valid", "test"), environ={})
    log = capfd.readouterr().out
    assert code == 0, log[-6000:]
    timings["trained"] = time.monotonic() - started
    assert f"model artifact: file://{output}/model.tar.gz" in log
    # Every metric definition finds its value in the real log, as SageMaker would.
    for definition in training.METRIC_DEFINITIONS:
        assert re.search(definition["Regex"], log), f"{definition['Name']} not in the log:\n{log[-4000:]}"
    best = max(float(value) for value in re.findall(training.METRIC_DEFINITIONS[0]["Regex"], log))
    assert best >= 0.8, log[-4000:]
    with tarfile.open(output / "model.tar.gz") as archive:
        names = archive.getnames()
    assert {"manifest.json", "model.safetensors"} <= set(names)
    assert all("/" not in name.removeprefix("./") for name in names), f"files must sit at the root: {names}"
    assert not running(compose_containers(container_root))

    # Deploy: `deploy --local` owns the endpoint until it is interrupted, as a user runs it.
    port = free_port()
    server = Background(["deploy", "--local", "--port", str(port), "--container-root", str(container_root),
                         "--image-uri", image, "--model-data", f"file://{output}/model.tar.gz",
                         "--endpoint-name", "shapes-local"], {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        server.wait_for("Ctrl-C deletes it", timeout_s=180)
        timings["endpoint ready"] = time.monotonic() - started
        [endpoint_container] = running(compose_containers(container_root))

        # Predict with a session of its own, as from another shell: local mode finds the
        # endpoint by its port.
        code = main(["predict", "--local", "--port", str(port), "--endpoint-name", "shapes-local", str(held_out)],
                    environ={})
        table = capfd.readouterr().out
        assert code == 0, table
        code = main(["predict", "--local", "--port", str(port), "--endpoint-name", "shapes-local",
                     str(not_an_image)], environ={})
        refused = capfd.readouterr().err  # skipped files are listed on stderr, as classifier-predict lists them
        assert code == 1 and re.search(r"notes\.png: invalid_image: ", refused), refused
        timings["predicted"] = time.monotonic() - started
    finally:
        server.process.send_signal(signal.SIGINT)
        exit_code = server.finish(timeout_s=90)
    timings["deleted"] = time.monotonic() - started
    # file, label, probability of the top prediction, then the others
    rows = [match.groups() for line in table.splitlines() if (match := re.match(r"(\S+)\s+(\S+)\s+([0-9.]+)\s", line))]
    assert len(rows) == 5 * len(CLASSES), table
    assert {label for _, label, _ in rows} <= set(CLASSES), table
    correct = sum(Path(path).parent.name == label for path, label, _ in rows)
    assert correct >= 0.8 * len(rows), table

    # Delete: Ctrl-C deleted the endpoint, its config and model; the server shut down cleanly.
    assert exit_code == 0, server.output
    for deleted in ("deleted endpoint shapes-local", "deleted endpoint config shapes-local", "deleted model "):
        assert deleted in server.output, server.output
    assert running(compose_containers(container_root)) == []
    assert docker("inspect", "--format", "{{.State.ExitCode}}", endpoint_container).stdout.strip() == "0"
    assert not hosting.local_endpoint_answers(port)
    print(", ".join(f"{step} after {seconds:.0f} s" for step, seconds in timings.items()))


def test_two_local_instances_train_together(image: str, no_credentials: None, container_root: Path,
                                            tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_image_folder(data / "train", 12, seed=11)
    write_image_folder(data / "valid", 4, seed=12)
    output = tmp_path / "output"

    argv = train_argv(image, data, output, container_root, TWO_HOSTS, "valid")
    code = main([*argv, "--instance-count", "2"], environ={})
    log = capfd.readouterr().out
    assert code == 0, log[-6000:]
    hosts = set(re.findall(r"(algo-\d-[a-z0-9]{5})\s+\|", log))
    assert len(hosts) == 2, f"expected two hosts in the log, saw {hosts}"
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, log[-6000:]
    with tarfile.open(output / "model.tar.gz") as archive:
        assert {"manifest.json", "model.safetensors"} <= set(archive.getnames())
    containers = compose_containers(container_root)
    assert len(containers) == 2 and running(containers) == []
    codes = docker("inspect", "--format", "{{.State.ExitCode}}", *containers).stdout.split()
    assert codes == ["0", "0"], log[-6000:]
