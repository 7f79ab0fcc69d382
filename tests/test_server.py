"""The real server process: ``python -m serve`` under uvicorn, over real sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from imagedata import encode
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert process.poll() is None, "server exited before becoming ready"
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url}/ping did not answer 200 within {timeout_s} s")


@pytest.fixture
def server(tiny_artifact: Path):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SM_MODEL_DIR": str(tiny_artifact),
        "SAGEMAKER_BIND_TO_PORT": str(port),  # SageMaker's inference-pipeline port override
        "CLASSIFIER_HOST": "127.0.0.1",
        "CLASSIFIER_DEFAULT_MODEL": "false",
    }
    process = subprocess.Popen([sys.executable, "-m", "serve"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_real_server_classifies_and_stops_cleanly_on_sigterm(server) -> None:
    url, process = server
    response = httpx.post(f"{url}/invocations", content=encode(Image.new("RGB", (50, 50), "blue")),
                          headers={"Content-Type": "application/x-image"}, timeout=30)
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] in {"circle", "square", "triangle"}
    bad = httpx.post(f"{url}/invocations", content=b"\x00" * 10,
                     headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert bad.status_code == 400
    assert httpx.get(f"{url}/ping", timeout=2).status_code == 200

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
