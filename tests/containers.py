"""Helpers for tests that run the real images with the Docker CLI: the image under test, and
(from :mod:`deploy.host`, which check and the benchmarks use too) Docker, /opt/ml and serving."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from deploy.host import (  # noqa: F401 - the tests' helpers, in one place
    Served,
    direct_url,
    docker,
    serving,
    wait_for_ping,
    write_training_config,
)

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


def compose(*args: str, env: Mapping[str, str], timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """``docker compose`` on the project's docker-compose.yml, with ``env`` over this process's environment."""
    result = subprocess.run(["docker", "compose", *args], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def classify(url: str, body: bytes, content_type: str = "image/png") -> list[dict]:
    response = httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]
