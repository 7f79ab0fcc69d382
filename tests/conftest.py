from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/imagedata.py and friends

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from classifier.models import create_model

TINY_CLASSES = ("circle", "square", "triangle")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Code under test may configure logging (the entry points do); put it back after each test,
    so no handler outlives the captured stream it writes to."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def mocked_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto in this process, with none of this machine's AWS settings: test credentials, us-east-1."""
    from moto import mock_aws

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield


@pytest.fixture
def tiny_artifact(tmp_path: Path) -> Path:
    """A randomly initialised resnet18 saved in the real artifact format."""
    manifest = Manifest(
        architecture="resnet18",
        class_names=TINY_CLASSES,
        preprocessing=Preprocessing(crop_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3),
    )
    return artifact.save(tmp_path / "model", create_model("resnet18", len(TINY_CLASSES)), manifest)


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A region and nothing else: no keys, no profiles, no instance metadata probing."""
    from sdk_local import REGION

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def container_root(tmp_path: Path) -> Iterator[Path]:
    """Where SDK local mode writes its compose files; containers it leaves behind are removed."""
    from containers import docker
    from sdk_local import compose_containers

    root = tmp_path / "sagemaker-local"
    yield root
    leftovers = compose_containers(root)
    if leftovers:  # local mode stops its containers but never removes them
        docker("rm", "-f", *leftovers, check=False)
