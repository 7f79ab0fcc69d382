"""Helpers for tests that drive the SageMaker SDK's local mode: the containers local mode started,
found by the compose working-directory label (fixtures ``no_credentials`` and ``container_root``
are in conftest.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from containers import docker

T = TypeVar("T")

REGION = "us-east-1"


def compose_containers(root: Path) -> list[str]:
    """IDs of the containers local mode started from compose files under ``root``."""
    listing = docker("ps", "-a", "--format", '{{.ID}} {{.Label "com.docker.compose.project.working_dir"}}').stdout
    ids = []
    for line in listing.splitlines():
        container, _, working_dir = line.partition(" ")
        if working_dir.startswith(f"{root}{os.sep}"):
            ids.append(container)
    return ids


def running(containers: list[str]) -> list[str]:
    if not containers:
        return []
    states = docker("inspect", "--format", "{{.State.Running}}", *containers, check=False).stdout.split()
    return [container for container, state in zip(containers, states, strict=False) if state == "true"]


def bounded(call: Callable[[], T], *, timeout_s: float, root: Path) -> T:
    """``call()`` in a worker thread, for a local-mode job: it waits on its container with no
    deadline of its own (its requests to ``/invocations`` have no timeout). Past ``timeout_s`` the
    containers local mode started under ``root`` are removed, which ends those requests, and the
    test fails."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name="local-mode-job", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        leftovers = compose_containers(root)
        if leftovers:
            docker("rm", "-f", *leftovers, check=False)
        worker.join(30)
        raise AssertionError(f"the local-mode job did not finish within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
