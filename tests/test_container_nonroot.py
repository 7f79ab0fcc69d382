"""The real image unprivileged, on a read-only root filesystem, as docker compose runs it and as
``docker run --user 1000:1000 --read-only --tmpfs /tmp`` does on EC2: only /tmp and the mounted
/opt/ml folders are writable."""

from __future__ import annotations

import json
import shutil
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest

from classifier import artifact

from containers import classify, compose, docker, image_for, serving, wait_for_ping, write_training_config
from imagedata import CLASSES, cat_photo_jpeg, write_image_folder
from ports import free_port

pytestmark = pytest.mark.container
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
USER = "1000:1000"  # the image's own unprivileged user
# What docker-compose.yml asks for, as `docker run` flags (Docker's default tmpfs: noexec).
LOCKED_DOWN = ("--user", USER, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges:true")
FAST = {"architecture": "resnet18", "pretrained": "false", "image_size": "32", "batch_size": "8",
        "workers": "1", "epochs": "1"}


def test_compose_serves_unprivileged_on_a_read_only_root_filesystem(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"  # empty: the built-in ImageNet model
    model_dir.mkdir()
    port = free_port()
    # Empty CLASSIFIER_UID/GID: the file's defaults, whatever the caller's environment holds.
    env = {"CLASSIFIER_IMAGE": image_for("cpu"), "CLASSIFIER_PORT": str(port), "MODEL_DIR": str(model_dir),
           "CLASSIFIER_UID": "", "CLASSIFIER_GID": ""}
    project = f"classifier-nonroot-{uuid.uuid4().hex[:8]}"
    try:
        compose("-p", project, "up", "-d", "--no-build", "--pull", "never", "serve", env=env)
        container = compose("-p", project, "ps", "-q", "serve", env=env).stdout.strip()
        assert container, f"compose project {project} started no serve container"

        def logs() -> str:
            result = docker("logs", container, check=False)
            return result.stdout + result.stderr

        wait_for_ping(f"http://127.0.0.1:{port}", describe=logs)
        settings = json.loads(docker("inspect", container).stdout)[0]
        assert settings["Config"]["User"] == USER
        host = settings["HostConfig"]
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert "/tmp" in host["Tmpfs"]
        status = docker("exec", container, "cat", "/proc/1/status").stdout
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["1000"] * 4, uid_line  # real, effective, saved and filesystem uid

        predictions = classify(f"http://127.0.0.1:{port}", cat_photo_jpeg(), "image/jpeg")
        assert predictions[0]["label"] in CAT_CLASSES, predictions
    finally:
        down = compose("-p", project, "down", "--remove-orphans", "-t", "5", env=env, check=False)
    assert down.returncode == 0, down.stderr[-4000:]
    label = f"label=com.docker.compose.project={project}"
    assert docker("ps", "-aq", "--filter", label).stdout.strip() == ""
    assert docker("network", "ls", "-q", "--filter", label).stdout.strip() == ""


def test_handler_requirements_install_under_tmp_when_the_image_is_read_only(tmp_path: Path) -> None:
    """A package the image lacks and a pin of one it has (six): both land in the overlay under /tmp
    and win over the image's copies."""
    code = tmp_path / "model" / "code"
    code.mkdir(parents=True)
    (code / "requirements.txt").write_text("humanize==4.9.0\nsix==1.16.0\n")
    (code / "inference.py").write_text(textwrap.dedent("""
        import json

        import humanize
        import six


        def model_fn(model_dir):
            return None


        def transform_fn(model, body, content_type, accept):
            return json.dumps({"size": humanize.intcomma(len(body)), "humanize": humanize.__version__,
                               "six": six.__version__, "files": [humanize.__file__, six.__file__]})
    """))
    with serving(image_for("cpu"), *LOCKED_DOWN, "-v", f"{tmp_path / 'model'}:/opt/ml/model:ro") as served:
        response = httpx.post(f"{served.url}/invocations", content=b"x" * 12345,
                              headers={"Content-Type": "application/octet-stream"}, timeout=30)
        assert response.status_code == 200, response.text
        answer = response.json()
        logs = docker("logs", served.container).stderr
    assert answer["size"] == "12,345"
    assert (answer["humanize"], answer["six"]) == ("4.9.0", "1.16.0")
    assert all(path.startswith("/tmp/classifier-packages/") for path in answer["files"]), answer
    assert "the image's packages are read-only" in logs


def opt_ml(base: Path) -> Path:
    write_image_folder(base / "input" / "data" / "training", 8, seed=41, size=32)
    write_image_folder(base / "input" / "data" / "validation", 2, seed=42, size=32)
    write_training_config(base, FAST, ["training", "validation"])
    for name in ("model", "output", "checkpoints"):
        (base / name).mkdir()
    return base


def test_training_unprivileged_on_a_read_only_root_filesystem_writes_the_artifact(tmp_path: Path) -> None:
    base = opt_ml(tmp_path / "ml")
    for name in ("model", "output", "checkpoints"):
        (base / name).chmod(0o777)  # writable by the container's user, whoever runs the test
    run = docker("run", "--rm", *LOCKED_DOWN, "-v", f"{base}:/opt/ml", image_for("cpu"), "train", check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Read-only file system" not in run.stderr, "something wrote outside /tmp and /opt/ml"
    assert artifact.load_manifest(base / "model").class_names == tuple(sorted(CLASSES))
    assert (base / "model" / artifact.MANIFEST_FILE).stat().st_uid == 1000
    assert (base / "output" / "data" / "metrics.json").is_file()
    assert not (base / "output" / "failure").exists()


def test_a_model_folder_the_user_cannot_write_fails_before_training(tmp_path: Path) -> None:
    """As when Docker creates a missing host folder for a bind mount: owned by root."""
    base = opt_ml(tmp_path / "ml")
    shutil.rmtree(base / "input" / "data")  # nothing to train on: the check must come first
    (base / "model").chmod(0o555)
    run = docker("run", "--rm", *LOCKED_DOWN, "-v", f"{base}:/opt/ml", image_for("cpu"), "train", check=False)
    assert run.returncode == 1
    assert "train: /opt/ml/model is not writable by uid 1000" in run.stderr, run.stderr[-2000:]


def test_a_training_scripts_requirements_install_under_tmp_when_the_image_is_read_only(tmp_path: Path) -> None:
    """Script mode: the script and the programs it starts see the overlay's packages first."""
    base = tmp_path / "ml"
    code = base / "code"
    code.mkdir(parents=True)
    (code / "requirements.txt").write_text("humanize==4.9.0\nsix==1.16.0\n")
    (code / "train.py").write_text(textwrap.dedent("""
        import json, os, subprocess, sys

        import humanize, six

        child = subprocess.run([sys.executable, "-c", "import six; print(six.__version__)"], capture_output=True,
                               text=True, check=True).stdout.strip()
        with open(os.path.join(os.environ["SM_MODEL_DIR"], "versions.json"), "w") as f:
            json.dump({"humanize": humanize.__version__, "six": six.__version__, "child_six": child,
                       "file": humanize.__file__}, f)
    """))
    write_training_config(base, {"sagemaker_program": json.dumps("train.py")}, [])
    for name in ("model", "output"):
        (base / name).mkdir()
        (base / name).chmod(0o777)
    run = docker("run", "--rm", *LOCKED_DOWN, "-v", f"{base}:/opt/ml", image_for("cpu"), "train", check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    versions = json.loads((base / "model" / "versions.json").read_text())
    assert (versions["humanize"], versions["six"], versions["child_six"]) == ("4.9.0", "1.16.0", "1.16.0")
    assert versions["file"].startswith("/tmp/classifier-packages/"), versions
