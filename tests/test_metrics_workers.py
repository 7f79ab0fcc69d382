"""Observability of a server with several worker processes: ``/metrics`` reports every worker, and
``LOG_FORMAT=json`` writes one JSON object per line (the real server, over real sockets).

The workers share one listening socket, so which of them takes a connection is the kernel's
choice. The tests that need a particular worker to answer pause the other (SIGSTOP): a stopped
process cannot accept, so the running one takes every connection. uvicorn replaces a worker that
misses its health check for 5 s; each pause here lasts a few small requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from artifacts import constant_artifact
from imagedata import encode
from server_process import server

CLASSES = ("cat", "dog")
STARTED = "Application startup complete."  # uvicorn's line once a worker takes connections
BODY = encode(Image.new("RGB", (40, 40), "green"))


class ServerOutput:
    """What the server writes (its stderr; ``server()`` merges it into stdout), read as it comes."""

    def __init__(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        self.data = b""
        self.closed = False

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def read(self, timeout_s: float) -> None:
        if not self.closed and select.select([self.fd], [], [], max(0.0, timeout_s))[0]:
            chunk = os.read(self.fd, 65536)
            self.data += chunk
            self.closed = not chunk

    def wait_for(self, text: str, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.text.count(text) < count:
            assert not self.closed and time.monotonic() < deadline, f"{text!r} not seen {count} times:\n{self.text}"
            self.read(deadline - time.monotonic())

    def read_to_end(self, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.closed:
            assert time.monotonic() < deadline, f"the server's output is still open:\n{self.text}"
            self.read(deadline - time.monotonic())
        return self.text


def metrics_dir_in(temp: Path) -> Path:
    [found] = temp.glob("serve-metrics-*")
    return found


def worker_pids(metrics_dir: Path) -> set[int]:
    """The processes that have written counters (one file each, named after the pid)."""
    return {int(path.stem.rsplit("_", 1)[1]) for path in metrics_dir.glob("counter_*.db")}


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def classify(url: str, count: int) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            response = client.post(f"{url}/invocations", content=BODY, headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text


def invocations_counted(url: str) -> float:
    """``classifier_requests_total{path="/invocations",status="200"}`` in one scrape of /metrics."""
    scrape = httpx.get(f"{url}/metrics", timeout=10)
    assert scrape.status_code == 200
    for family in text_string_to_metric_families(scrape.text):
        for sample in family.samples:
            if sample.name == "classifier_requests_total" and sample.labels == {"path": "/invocations",
                                                                                 "status": "200"}:
                return sample.value
    return 0.0


def start_two_workers(tmp_path: Path, **env: str) -> contextlib.AbstractContextManager[tuple[str, subprocess.Popen]]:
    model = constant_artifact(tmp_path / "model", CLASSES, "dog")
    temp = tmp_path / "tmp"
    temp.mkdir()
    return server(model, SAGEMAKER_MODEL_SERVER_WORKERS="2", TMPDIR=str(temp), **env)


def test_one_scrape_sums_the_requests_of_both_workers(tmp_path: Path) -> None:
    with start_two_workers(tmp_path) as (url, process):
        output = ServerOutput(process)
        output.wait_for(STARTED, count=2)
        metrics_dir = metrics_dir_in(tmp_path / "tmp")
        assert stat.S_IMODE(metrics_dir.stat().st_mode) == 0o700
        first, second = sorted(worker_pids(metrics_dir))
        with stopped(second):
            classify(url, 3)  # all answered by the first worker
        with stopped(first):
            classify(url, 5)  # all answered by the second
        assert invocations_counted(url) == 8  # either worker alone counted 3 or 5
        assert worker_pids(metrics_dir) == {first, second}
        process.send_signal(signal.SIGTERM)
        output.read_to_end()
        assert process.wait(timeout=40) == 0
    assert not metrics_dir.exists()


def test_a_worker_that_dies_still_counts(tmp_path: Path) -> None:
    """uvicorn replaces a worker that dies; what it had counted stays in the totals."""
    with start_two_workers(tmp_path) as (url, process):
        output = ServerOutput(process)
        output.wait_for(STARTED, count=2)
        metrics_dir = metrics_dir_in(tmp_path / "tmp")
        first, second = sorted(worker_pids(metrics_dir))
        with stopped(second):
            classify(url, 3)
        os.kill(first, signal.SIGKILL)
        output.wait_for(STARTED, count=3)  # its replacement
        [replacement] = worker_pids(metrics_dir) - {first, second}
        with stopped(second):
            classify(url, 2)  # all answered by the replacement
        assert invocations_counted(url) == 5
        assert replacement in worker_pids(metrics_dir)


def test_json_logs_every_line_as_an_object_with_the_request(tmp_path: Path) -> None:
    with start_two_workers(tmp_path, LOG_FORMAT="json") as (url, process):
        output = ServerOutput(process)
        with httpx.Client(timeout=30) as client:
            for index in range(4):
                response = client.post(f"{url}/invocations", content=BODY,
                                       headers={"Content-Type": "image/png", "X-Request-Id": f"good-{index}"})
                assert response.status_code == 200
            response = client.post(f"{url}/invocations", content=b"not an image",
                                   headers={"Content-Type": "image/png", "X-Request-Id": "bad"})
            assert response.status_code == 400
        process.send_signal(signal.SIGTERM)
        text = output.read_to_end()
        assert process.wait(timeout=40) == 0
    entries = [json.loads(line) for line in text.splitlines()]  # every line, from every process
    access = [entry for entry in entries if entry["logger"] == "serve.access"]
    assert {entry["request_id"]: entry["status"] for entry in access} == {
        "good-0": 200, "good-1": 200, "good-2": 200, "good-3": 200, "bad": 400}
    assert len(access) == 5
    for entry in access:
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
        assert entry["level"] == "INFO" and entry["message"].startswith("POST /invocations ")
