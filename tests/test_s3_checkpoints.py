"""Training outside SageMaker: checkpoints mirrored to S3 (moto) and the EC2 spot notice (a fake
instance metadata service on 127.0.0.1).

The end-to-end test runs ``python -m train`` as a user on EC2 would: a spot instance whose
metadata service announces the interruption once the first checkpoint is in S3 stops itself with
the newest checkpoint uploaded; a second run on a "new machine" (an empty checkpoint folder, the
same S3 prefix) downloads it, resumes and ends with the weights of a run never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import safetensors.torch
import torch

from train import checkpoint
from train.s3_checkpoints import S3Checkpoints, spot_interruption_notice, watch_for_spot_notice
from train.settings import SettingsError, resolve, split_s3_uri

from imagedata import write_image_folder
from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "classifier-checkpoints"
ARGS = ["--architecture", "resnet18", "--pretrained", "false", "--image-size", "32",
        "--batch-size", "8", "--epochs", "3", "--checkpoint-steps", "2", "--seed", "7", "--workers", "0"]
NOTICE = {"action": "terminate", "time": "2026-12-03T17:00:00Z"}


class FakeImds:
    """EC2's instance metadata service, as far as the spot notice goes: IMDSv2 tokens (or v1
    only), and ``spot/instance-action`` answering 404 until ``announce()``."""

    def __init__(self, *, tokens: bool = True) -> None:
        self.tokens = tokens
        self.announced = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def reply(self, status: int, body: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:  # noqa: N802
                imds.requests.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
                if imds.tokens and self.path == "/latest/api/token":
                    self.reply(200, b"secret-token")
                else:
                    self.reply(403)

            def do_GET(self) -> None:  # noqa: N802
                token = self.headers.get("X-aws-ec2-metadata-token")
                imds.requests.append(("GET", self.path, token))
                if imds.tokens and token != "secret-token":
                    self.reply(401)
                elif self.path != "/latest/meta-data/spot/instance-action" or not imds.announced.is_set():
                    self.reply(404)
                else:
                    self.reply(200, json.dumps(NOTICE).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def announce(self) -> None:
        self.announced.set()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    server = FakeImds()
    yield server
    server.close()


# --- the pieces, in process ------------------------------------------------------------------


@pytest.fixture
def s3(mocked_aws: None) -> Any:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def keys(client, prefix: str = "") -> list[str]:
    return sorted(item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_sync_uploads_new_checkpoints_and_drops_the_ones_no_longer_kept(s3, tmp_path: Path) -> None:
    mirror = S3Checkpoints(f"s3://{BUCKET}/runs/dogs", tmp_path, s3)
    for step in (2, 4, 6):  # the folder keeps the newest two
        checkpoint.save(tmp_path, {"epoch": 1, "step_in_epoch": step, "value": torch.tensor([step])}, step)
        mirror.sync()
    assert keys(s3) == ["runs/dogs/checkpoint-0000000004.pt", "runs/dogs/checkpoint-0000000006.pt"]
    s3.put_object(Bucket=BUCKET, Key="runs/dogs/notes.txt", Body=b"the user's own file")
    s3.put_object(Bucket=BUCKET, Key="runs/dogs/old/checkpoint-0000000001.pt", Body=b"elsewhere")
    mirror.sync()
    assert "runs/dogs/notes.txt" in keys(s3) and "runs/dogs/old/checkpoint-0000000001.pt" in keys(s3)


def test_restore_fills_an_empty_folder_and_leaves_a_full_one_alone(s3, tmp_path: Path) -> None:
    first = tmp_path / "first"
    for step in (2, 4):
        checkpoint.save(first, {"epoch": 1, "step_in_epoch": step, "value": torch.tensor([step])}, step)
    S3Checkpoints(f"s3://{BUCKET}/run/", first, s3).flush()

    fresh = tmp_path / "fresh"
    assert S3Checkpoints(f"s3://{BUCKET}/run/", fresh, s3).restore() == [
        "checkpoint-0000000002.pt", "checkpoint-0000000004.pt"]
    assert checkpoint.load_latest(fresh)["step_in_epoch"] == 4
    assert not list(fresh.glob(".*"))  # no download left half-written

    newer = tmp_path / "newer"
    checkpoint.save(newer, {"epoch": 1, "step_in_epoch": 5, "value": torch.tensor([5])}, 5)
    assert S3Checkpoints(f"s3://{BUCKET}/run/", newer, s3).restore() == []
    assert [path.name for path in checkpoint.list_checkpoints(newer)] == ["checkpoint-0000000005.pt"]


def test_a_folder_left_from_an_older_run_takes_the_newer_checkpoints_and_deletes_none(s3, tmp_path: Path) -> None:
    """A machine whose disk still holds checkpoints 1 and 2 resumes from the prefix's 3 and 4, and
    its next sync leaves them there."""
    ahead, stale = tmp_path / "ahead", tmp_path / "stale"
    for step in (3, 4):
        checkpoint.save(ahead, {"epoch": 1, "step_in_epoch": step, "value": torch.tensor([step])}, step)
    S3Checkpoints(f"s3://{BUCKET}/run/", ahead, s3).flush()
    for step in (1, 2):
        checkpoint.save(stale, {"epoch": 1, "step_in_epoch": step, "value": torch.tensor([step])}, step)

    mirror = S3Checkpoints(f"s3://{BUCKET}/run/", stale, s3)
    assert mirror.restore() == ["checkpoint-0000000003.pt", "checkpoint-0000000004.pt"]
    assert checkpoint.load_latest(stale)["step_in_epoch"] == 4
    mirror.sync()
    assert keys(s3) == ["run/checkpoint-0000000001.pt", "run/checkpoint-0000000002.pt",
                        "run/checkpoint-0000000003.pt", "run/checkpoint-0000000004.pt"]
    checkpoint.save(stale, {"epoch": 1, "step_in_epoch": 5, "value": torch.tensor([5])}, 5)  # keeps 4 and 5
    mirror.sync()
    assert keys(s3) == ["run/checkpoint-0000000004.pt", "run/checkpoint-0000000005.pt"]

    # A prefix ahead of the folder (another run writing to it) loses nothing to this one's sync.
    S3Checkpoints(f"s3://{BUCKET}/run/", tmp_path / "empty", s3).sync()
    s3.put_object(Bucket=BUCKET, Key="run/checkpoint-0000000009.pt", Body=b"another run's")
    mirror.sync()
    assert "run/checkpoint-0000000009.pt" in keys(s3)


def test_an_unreachable_bucket_is_a_clear_error(s3, tmp_path: Path) -> None:
    from train.s3_checkpoints import CheckpointSyncError

    with pytest.raises(CheckpointSyncError, match="cannot list s3://no-such-bucket/x/"):
        S3Checkpoints("s3://no-such-bucket/x/", tmp_path, s3).restore()


@pytest.mark.parametrize("uri", ["bucket/prefix", "https://bucket/prefix", "s3://"])
def test_a_checkpoint_uri_that_is_not_s3_is_refused_before_training(tmp_path: Path, uri: str) -> None:
    write_image_folder(tmp_path / "data", 2, seed=0)
    with pytest.raises(SettingsError, match="s3://bucket/prefix/"):
        resolve(["--train", str(tmp_path / "data"), "--base-dir", str(tmp_path), "--checkpoint-s3-uri", uri], {})
    assert split_s3_uri("s3://bucket/a/b") == ("bucket", "a/b/")


def test_settings_take_the_uri_and_spot_from_flags_or_environment(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "data", 2, seed=0)
    base = ["--train", str(tmp_path / "data"), "--base-dir", str(tmp_path)]
    settings = resolve([*base, "--checkpoint-s3-uri", "s3://b/p/", "--spot"], {})
    assert (settings.paths.checkpoint_s3_uri, settings.spot) == ("s3://b/p/", True)
    settings = resolve(base, {"CLASSIFIER_CHECKPOINT_S3_URI": "s3://b/q/", "CLASSIFIER_SPOT": "true",
                              "CLASSIFIER_SPOT_POLL_S": "0.5",
                              "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://[fd00:ec2::254]/"})
    assert (settings.paths.checkpoint_s3_uri, settings.spot) == ("s3://b/q/", True)
    assert (settings.spot_poll_s, settings.metadata_endpoint) == (0.5, "http://[fd00:ec2::254]")
    settings = resolve(base, {})
    assert (settings.paths.checkpoint_s3_uri, settings.spot) == (None, False)
    assert (settings.spot_poll_s, settings.metadata_endpoint) == (5.0, "http://169.254.169.254")
    for bad in ("0", "soon", "61"):
        with pytest.raises(SettingsError, match="CLASSIFIER_SPOT_POLL_S"):
            resolve(base, {"CLASSIFIER_SPOT_POLL_S": bad})


@pytest.mark.parametrize("tokens", [True, False], ids=["imdsv2", "imdsv1"])
def test_the_spot_notice_is_read_with_or_without_a_session_token(tokens: bool) -> None:
    server = FakeImds(tokens=tokens)
    try:
        assert spot_interruption_notice(server.url) is None
        server.announce()
        assert json.loads(spot_interruption_notice(server.url)) == NOTICE
        if tokens:
            assert ("GET", "/latest/meta-data/spot/instance-action", "secret-token") in server.requests
    finally:
        server.close()


def test_the_watcher_sets_stop_on_the_notice(imds: FakeImds) -> None:
    stop = threading.Event()
    thread = watch_for_spot_notice(stop, imds.url, 0.05, threading.Event())
    assert not stop.wait(0.3)
    imds.announce()
    assert stop.wait(10)
    thread.join(10)
    assert not thread.is_alive()


def test_the_watcher_ends_with_the_run(imds: FakeImds) -> None:
    stop, done = threading.Event(), threading.Event()
    thread = watch_for_spot_notice(stop, imds.url, 0.05, done)
    done.set()
    thread.join(10)
    assert not thread.is_alive() and not stop.is_set()


def test_a_metadata_service_that_does_not_answer_is_reported_once(caplog) -> None:
    stop, done = threading.Event(), threading.Event()
    url = f"http://127.0.0.1:{free_port()}"
    assert spot_interruption_notice(url, timeout_s=1) is None
    with caplog.at_level("WARNING", logger="train.s3_checkpoints"):
        thread = watch_for_spot_notice(stop, url, 0.05, done)
        deadline = time.monotonic() + 10
        while not any("does not answer" in record.message for record in caplog.records):
            assert time.monotonic() < deadline, "no warning"
            time.sleep(0.05)
        done.set()
        thread.join(10)
    assert sum("does not answer" in record.message for record in caplog.records) == 1
    assert not stop.is_set()


# --- a spot instance stops itself, a new one resumes from S3 ---------------------------------


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "moto's server exited"
            try:
                if httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def aws_env(moto_url: str, imds_url: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    return {**env, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_url, "CLASSIFIER_SPOT_POLL_S": "0.2"}


def test_a_spot_interrupted_run_resumes_on_a_new_machine_from_s3(moto_server: str, imds: FakeImds,
                                                                  tmp_path: Path) -> None:
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/dogs/checkpoints/"
    data = tmp_path / "data"
    write_image_folder(data / "train", 16, seed=1)
    write_image_folder(data / "valid", 4, seed=2)
    env = aws_env(moto_server, imds.url)

    def command(base: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "train", "--train", str(data), "--base-dir", str(base), *ARGS, *extra]

    reference = subprocess.run(command(tmp_path / "reference"), cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=600, check=False)
    assert reference.returncode == 0, reference.stderr[-3000:]

    # The first instance: the notice comes once a checkpoint has reached S3.
    first = tmp_path / "first"
    process = subprocess.Popen(command(first, "--checkpoint-s3-uri", uri, "--spot"), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not client.list_objects_v2(Bucket=BUCKET, Prefix="dogs/checkpoints/").get("KeyCount"):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint reached S3"
        time.sleep(0.1)
    imds.announce()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "spot interruption notice" in stderr and "run again to resume" in stderr
    newest_local = checkpoint.list_checkpoints(first / "checkpoints")[-1].name
    assert f"dogs/checkpoints/{newest_local}" in keys(client)  # uploaded before the process ended
    stopped_at = checkpoint.load_latest(first / "checkpoints")["global_step"]
    assert stopped_at < 3 * 6  # stopped before the end: 48 images / 8 = 6 steps per epoch

    # A new instance: nothing on its disk but the data.
    second = tmp_path / "second"
    resumed = subprocess.run(command(second, "--checkpoint-s3-uri", uri), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [downloaded] = [line for line in resumed.stderr.splitlines() if "checkpoints: downloaded" in line]
    assert newest_local in downloaded and f"resuming from {second / 'checkpoints' / newest_local}" in resumed.stderr
    expected = safetensors.torch.load_file(str(tmp_path / "reference" / "model" / "model.safetensors"))
    actual = safetensors.torch.load_file(str(second / "model" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # The prefix mirrors the new folder: its newest checkpoints, nothing older.
    assert keys(client, "dogs/checkpoints/") == [f"dogs/checkpoints/{path.name}"
                                                  for path in checkpoint.list_checkpoints(second / "checkpoints")]


@pytest.mark.container
def test_the_image_on_ec2_stops_at_the_spot_notice_and_a_fresh_container_resumes_from_s3(
        moto_server: str, imds: FakeImds, tmp_path: Path) -> None:
    """The same with the real image and Docker's defaults. The host's network only lets the
    containers reach moto and the fake metadata service on 127.0.0.1."""
    from containers import docker, image_for

    image = image_for("cpu")
    bucket = "ec2-spot-checkpoints"
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    data = tmp_path / "data"
    write_image_folder(data / "train", 16, seed=1)
    write_image_folder(data / "valid", 4, seed=2)
    env = [f"-e{name}={value}" for name, value in {
        "AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
        "CLASSIFIER_SPOT_POLL_S": "0.2"}.items()]
    train = ["train", "--train", "/data", "--checkpoint-s3-uri", f"s3://{bucket}/run/", *ARGS]
    containers: list[str] = []
    try:
        first = docker("run", "-d", "--network", "host", *env, "-v", f"{data}:/data:ro", image, *train,
                       "--spot").stdout.strip()
        containers.append(first)
        deadline = time.monotonic() + 300
        while not client.list_objects_v2(Bucket=bucket, Prefix="run/").get("KeyCount"):
            assert time.monotonic() < deadline, docker("logs", first, check=False).stderr[-3000:]
            time.sleep(0.2)
        imds.announce()
        assert docker("wait", first, timeout=180).stdout.strip() == str(128 + signal.SIGTERM)
        logs = docker("logs", first).stderr
        assert "spot interruption notice" in logs and "run again to resume" in logs

        out = tmp_path / "model"
        out.mkdir()
        second = docker("run", "-d", "--network", "host", *env, "-v", f"{data}:/data:ro",
                        "-v", f"{out}:/opt/ml/model", image, *train).stdout.strip()
        containers.append(second)
        code = docker("wait", second, timeout=600).stdout.strip()
        logs = docker("logs", second).stderr
        assert code == "0", logs[-3000:]
        assert "checkpoints: downloaded" in logs and "resuming from /opt/ml/checkpoints/" in logs
        assert (out / "model.safetensors").is_file()
    finally:
        for container in containers:
            docker("rm", "-f", container, check=False)
