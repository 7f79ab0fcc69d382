"""Helpers for tests that run the real images with the Docker CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

VARIANTS = ("cpu", "gpu")
ROOT = Path(__file__).resolve().parent.parent


def image_for(variant: str) -> str:
    """The image under test, built by tests/run.sh (CLASSIFIER_IMAGE_CPU / _GPU)."""
    image = os.environ.get(f"CLASSIFIER_IMAGE_{variant.upper()}")
    if not image:
        reason = f"CLASSIFIER_IMAGE_{variant.upper()} is not set; run the suite with tests/run.sh"
        if os.environ.get("CLASSIFIER_REQUIRE_CONTAINERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    return image


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def compose(*args: str, env: Mapping[str, str], timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """``docker compose`` on the project's docker-compose.yml, with ``env`` over this process's environment."""
    result = subprocess.run(["docker", "compose", *args], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def write_training_config(base: Path, hyperparameters: dict[str, str], channels: Sequence[str],
                          *, current_host: str = "algo-1", hosts: Sequence[str] = ("algo-1",)) -> None:
    """SageMaker's three config files, as the platform writes them (every value a string)."""
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "inputdataconfig.json").write_text(json.dumps({
        name: {"ContentType": "application/x-image", "TrainingInputMode": "File",
               "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
        for name in channels
    }))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": current_host, "hosts": list(hosts), "network_interface_name": "eth0"}
    ))


def wait_for_ping(url: str, timeout_s: float = 120, describe: Callable[[], str] = str) -> None:
    """Poll ``url``/ping until it answers 200; fail with ``describe()`` (e.g. logs) on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no 200 from {url}/ping within {timeout_s} s\n{describe()}")
        time.sleep(0.2)


@dataclass(frozen=True)
class Served:
    url: str
    container: str
    seconds_to_ready: float


@contextlib.contextmanager
def serving(image: str, *docker_args: str, port: int = 8080, command: Sequence[str] = ("serve",)) -> Iterator[Served]:
    """Run the image's server with ``port`` published on a random 127.0.0.1 port, until ready."""
    started = time.monotonic()
    container = docker("run", "-d", "-p", f"127.0.0.1::{port}", *docker_args, image, *command).stdout.strip()
    try:
        host_port = docker("port", container, f"{port}/tcp").stdout.splitlines()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{host_port}"

        def logs() -> str:
            result = docker("logs", container, check=False)
            return result.stdout + result.stderr

        wait_for_ping(url, describe=logs)
        yield Served(url, container, time.monotonic() - started)
    finally:
        docker("rm", "-f", container, check=False)


def classify(url: str, body: bytes, content_type: str = "image/png") -> list[dict]:
    response = httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def direct_url(container: str, port: int = 8080) -> str | None:
    """The container's own address on Docker's bridge network, if this host can reach it.

    SageMaker's front end talks to the container directly, and TorchServe here runs natively, so
    our server is measured the same way rather than through Docker's userland port proxy (which
    copies every byte through one more process)."""
    address = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container,
                     check=False).stdout.strip()
    if not address:
        return None
    url = f"http://{address}:{port}"
    try:
        return url if httpx.get(f"{url}/ping", timeout=2).status_code == 200 else None
    except httpx.TransportError:
        return None
