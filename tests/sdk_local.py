"""Helpers for tests that drive the SageMaker SDK's local mode: the containers local mode started,
found by the compose working-directory label (fixtures ``no_credentials`` and ``container_root``
are in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

from containers import docker

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
