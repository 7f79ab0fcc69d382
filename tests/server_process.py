"""The real server process for tests: ``python -m serve`` under uvicorn on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited before becoming ready"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"{url}/ping did not answer 200 within {timeout_s} s")


@contextlib.contextmanager
def server(model_dir: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SM_MODEL_DIR": str(model_dir),
        "SAGEMAKER_BIND_TO_PORT": str(port),  # SageMaker's inference-pipeline port override
        "CLASSIFIER_HOST": "127.0.0.1",
        "CLASSIFIER_DEFAULT_MODEL": "false",
        **env,
    }
    process = subprocess.Popen([sys.executable, "-m", "serve"], env=environ, cwd=ROOT, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # worker processes too
        process.communicate(timeout=10)
