"""``python -m deploy check IMAGE``: run any image the way SageMaker does and check the contract.

Only what SageMaker itself does to a bring-your-own container is assumed: ``docker run IMAGE
train`` with the three config files and File-mode channels in a temporary ``/opt/ml``, ``docker
run IMAGE serve`` with the artifact in ``/opt/ml/model`` and HTTP on port 8080. Nothing about this
project's own image is assumed, so it works on other people's images::

    python -m deploy check sagemaker-classifier:cpu-abc123 --hp epochs=1 --hp image_size=32
    python -m deploy check my-server:latest --skip-train --model-dir ./model --json

The generated dataset is an ImageFolder (3 classes of 8 PNG shapes) in the ``training`` and
``validation`` channels. Hyperparameters are only the ``--hp`` ones, every value a string, as
SageMaker writes them. Each item ends PASS, FAIL, WARN (works, but not as SageMaker prefers) or
SKIP (not applicable); the exit code is 1 when any item failed. Every container runs on this
machine, is removed afterwards, and is reached only on 127.0.0.1.

Timing items measure from the container's start as Docker records it (``State.StartedAt``).
Accepting connections counts once a connection through the published port stays open or
answers: Docker's port proxy accepts every connection and closes it at once while nothing in
the container listens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy import host

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
MEGABYTE = 1024 * 1024
SERVING_PORT = 8080
BIND_PORT = 9090
BIND_LABEL = "com.amazonaws.sagemaker.capabilities.accept-bind-to-port"
ACCEPT_BUDGET_S = 0.25  # "accept socket connections within 250 ms of start-up"
PING_TIMEOUT_S = 2.0  # each health check times out after 2 s
PING_DEADLINE_S = 240.0  # pings must pass within 4 minutes of start
INVOKE_TIMEOUT_S = 60.0  # real-time invocations must answer within 60 s
STOP_TIMEOUT_S = 30  # SIGTERM, then SIGKILL 30 s later
FAILURE_REASON_CHARS = 1024  # the first 1024 characters of /opt/ml/output/failure are kept
BIG_BODY_BYTES = 7 * MEGABYTE  # over the 6 MB real-time payload limit
PINGS = 20
DEFAULT_BROKEN_HP = (("epochs", "not-a-number"),)
LOG = logging.getLogger(__name__)


class CheckError(RuntimeError):
    """Docker could not run the check at all (no Docker, no such image, a hung daemon)."""


class DockerTimeout(CheckError):
    """A docker command did not finish in time."""


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    name: str
    status: str  # PASS | FAIL | WARN | SKIP
    detail: str
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status != FAIL


@dataclass
class Report:
    image: str
    items: list[Item] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(item.passed for item in self.items)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def item(self, name: str) -> Item:
        return next(item for item in self.items if item.name == name)

    def to_dict(self) -> dict[str, Any]:
        counts = {status: sum(item.status == status for item in self.items) for status in (PASS, FAIL, WARN, SKIP)}
        return {
            "image": self.image, "passed": self.passed, "exit_code": self.exit_code, "counts": counts,
            "items": [{"name": item.name, "status": item.status, "passed": item.passed,
                       "seconds": round(item.seconds, 3), "detail": item.detail} for item in self.items],
        }


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def render_table(report: Report) -> str:
    rows = [("item", "result", "time", "detail")]
    rows += [(item.name, item.status, format_seconds(item.seconds), item.detail) for item in report.items]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[3]]).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in [*widths, len("detail")]))
    counts = report.to_dict()["counts"]
    summary = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    lines.append(f"\n{report.image}: {'passed' if report.passed else 'FAILED'} ({summary})")
    return "\n".join(lines)


# --- a tiny dataset --------------------------------------------------------------------------

def write_opt_ml(base: Path, hyperparameters: Mapping[str, str], *, data: bool = True) -> Path:
    """``/opt/ml`` as SageMaker prepares it for a one-host File-mode job."""
    for folder in ("model", "output/data"):
        (base / folder).mkdir(parents=True)
    if data:
        host.write_image_folder(base / "input" / "data" / "training", 8, seed=1)
        host.write_image_folder(base / "input" / "data" / "validation", 4, seed=2)
    return host.write_training_config(base, hyperparameters, ("training", "validation") if data else ("training",))


# --- Docker and HTTP -------------------------------------------------------------------------


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    LOG.info("docker %s", " ".join(args))
    try:
        return host.docker(*args, timeout=timeout, check=False)
    except host.DockerTimeout as error:
        raise DockerTimeout(str(error)) from None
    except host.DockerError as error:
        raise CheckError(str(error)) from None


def last_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# --- the check -------------------------------------------------------------------------------


@dataclass
class Server:
    container: str
    port: int
    started: float  # wall clock
    start_seconds: float = 0.0  # from docker create until the container's process started
    error: str = ""  # why it is not running


class Checker:
    """One run of the check; every container it starts is removed by :meth:`close`."""

    def __init__(self, image: str, workdir: Path, *, hyperparameters: Mapping[str, str],
                 broken_hyperparameters: Mapping[str, str], train_timeout_s: float, ping_deadline_s: float,
                 stop_timeout_s: int, progress: Callable[[Item], None] | None) -> None:
        self.image, self.workdir = image, workdir
        self.hyperparameters, self.broken = dict(hyperparameters), dict(broken_hyperparameters)
        self.train_timeout_s, self.ping_deadline_s, self.stop_timeout_s = train_timeout_s, ping_deadline_s, stop_timeout_s
        self.report = Report(image)
        self.progress = progress
        self.containers: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]
        sample = host.render("circle", random.Random(7), size=96)
        self.jpeg, self.png = host.encode(sample, "JPEG"), host.encode(sample, "PNG")

    def add(self, name: str, status: str, detail: str, seconds: float = 0.0) -> Item:
        item = Item(name, status, " ".join(detail.split()), seconds)  # one line each
        self.report.items.append(item)
        if self.progress:
            self.progress(item)
        return item

    def container_name(self, role: str) -> str:
        name = f"contract-check-{self.run_id}-{role}-{len(self.containers)}"
        self.containers.append(name)
        return name

    def close(self) -> None:
        for name in self.containers:
            try:
                docker("rm", "-f", "-v", name)
            except DockerTimeout:
                LOG.warning("could not remove container %s: remove it with docker rm -f", name)

    def logs(self, container: str) -> str:
        result = docker("logs", "--tail", "30", container)
        return last_line(result.stdout + result.stderr)

    def state(self, container: str) -> tuple[bool, int]:
        out = docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", container).stdout.split()
        return (out[0] == "true", int(out[1])) if len(out) == 2 else (False, -1)

    # --- the image ---

    def image_items(self) -> dict[str, str]:
        result = docker("image", "inspect", self.image)
        if result.returncode != 0:
            raise CheckError(f"docker image inspect {self.image}: {last_line(result.stderr) or 'failed'}")
        attrs = json.loads(result.stdout)[0]
        platform = f"{attrs.get('Os')}/{attrs.get('Architecture')}"
        if platform == "linux/amd64":
            self.add("platform linux/amd64", PASS, platform)
        elif platform == "linux/arm64":
            self.add("platform linux/amd64", WARN, f"{platform}: only Graviton (ml.*g) hosting instances run it")
        else:
            self.add("platform linux/amd64", FAIL, f"{platform}: SageMaker instances would fail with exec format error")
        config = attrs.get("Config") or {}
        user = config.get("User") or ""
        root = user.split(":")[0] in ("", "root", "0")
        self.add("runs as root", PASS if root else FAIL, f"User={user!r}" if user else "no USER set (root)")
        return config.get("Labels") or {}

    # --- training ---

    def train(self, base: Path, command: Sequence[str] = ("train",)) -> tuple[int | None, float, str]:
        """Run a training container on ``base`` as /opt/ml: (exit code or None on timeout, seconds, last log line)."""
        name = self.container_name("train")
        started = time.monotonic()
        environment = ["-e", f"TRAINING_JOB_NAME=contract-check-{self.run_id}",
                       "-e", f"TRAINING_JOB_ARN=arn:aws:sagemaker:us-east-1:000000000000:training-job/"
                             f"contract-check-{self.run_id}"]
        try:
            result = docker("run", "--name", name, "--hostname", "algo-1", *environment, "-v", f"{base}:/opt/ml",
                            self.image, *command, timeout=self.train_timeout_s)
        except DockerTimeout:
            return None, time.monotonic() - started, self.logs(name)
        finally:
            docker("rm", "-f", name)  # stops it too after a timeout
        return result.returncode, time.monotonic() - started, last_line(result.stdout + result.stderr)

    def artifact(self, base: Path) -> list[str]:
        return sorted(str(path.relative_to(base / "model")) for path in (base / "model").rglob("*") if path.is_file())

    def train_items(self) -> Path | None:
        base = write_opt_ml(self.workdir / "train", self.hyperparameters)
        code, seconds, tail = self.train(base)
        if code is None:
            self.add("train exits 0", FAIL, f"still running after {self.train_timeout_s:g} s (--timeout); {tail}",
                     seconds)
        else:
            failure = base / "output" / "failure"
            why = f"; failure: {failure.read_text(errors='replace')[:200]}" if failure.exists() else ""
            self.add("train exits 0", PASS if code == 0 else FAIL,
                     f"exit code {code}" + ("" if code == 0 else f"; {tail}{why}"), seconds)
        files = self.artifact(base)
        if files:
            shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
            self.add("artifact written", PASS, f"/opt/ml/model: {shown}")
            return base / "model"
        self.add("artifact written", FAIL, "/opt/ml/model is empty after training")
        return None

    def broken_config_item(self) -> None:
        base = write_opt_ml(self.workdir / "broken", {**self.hyperparameters, **self.broken}, data=False)
        broken = ", ".join(f"{key}={value}" for key, value in self.broken.items())
        what = f"{broken}, no data in channel 'training'"
        code, seconds, tail = self.train(base)
        failure = base / "output" / "failure"
        text = failure.read_text(errors="replace") if failure.is_file() else ""
        if code is None:
            self.add("failure file on a broken config", FAIL, f"{what}: still running after "
                     f"{self.train_timeout_s:g} s", seconds)
        elif code == 0:
            self.add("failure file on a broken config", FAIL, f"{what}: exit code 0 (the job would complete)",
                     seconds)
        elif not text.strip():
            self.add("failure file on a broken config", FAIL, f"{what}: exit code {code} but /opt/ml/output/failure "
                     f"is {'empty' if failure.exists() else 'missing'} (no FailureReason); {tail}", seconds)
        else:
            long = len(text) > FAILURE_REASON_CHARS
            self.add("failure file on a broken config", WARN if long else PASS,
                     f"{what}: exit code {code}, {len(text)} characters"
                     + (f" (SageMaker keeps the first {FAILURE_REASON_CHARS})" if long else "")
                     + f": {text.strip().splitlines()[0][:160]}", seconds)

    # --- serving ---

    def start(self, model_dir: Path, *, command: Sequence[str] = ("serve",), port: int = SERVING_PORT,
              env: Mapping[str, str] | None = None) -> tuple[Server, float | None]:
        """Start a server; returns it and the seconds from its start until it accepted a connection."""
        host_port, began = host.free_port(), time.monotonic()
        name = self.container_name("serve")
        environment = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        created = docker("create", "--name", name, "-p", f"127.0.0.1:{host_port}:{port}",
                         "-v", f"{model_dir}:/opt/ml/model", *environment, self.image, *command)
        if created.returncode != 0:
            return Server(name, host_port, time.time(), error=f"docker create: {last_line(created.stderr)}"), None
        invoked, invoked_monotonic = time.time(), time.monotonic()
        LOG.info("docker start %s", name)
        starter = subprocess.Popen(["docker", "start", name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        accepted, deadline, next_state = None, time.monotonic() + self.ping_deadline_s, time.monotonic() + 1
        while accepted is None and time.monotonic() < deadline:
            attempted = time.time()  # a connection that stays open was accepted when it was made
            if host.connection_accepted(host_port):
                accepted = attempted
            elif starter.poll() is not None and time.monotonic() > next_state:
                next_state = time.monotonic() + 1
                if starter.returncode != 0 or not self.state(name)[0]:
                    break
            time.sleep(0.005)
        try:
            _, start_error = starter.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            starter.kill()
            raise DockerTimeout(f"docker start {name} did not finish within 60 s") from None
        started = host.started_at(name, invoked)
        server = Server(name, host_port, started, max(0.0, started - invoked) + (invoked_monotonic - began))
        running, code = self.state(name)
        if starter.returncode != 0:
            server.error = f"docker start: {last_line(start_error)}"
        elif not running:
            server.error = f"exited with code {code}: {self.logs(name)}"
        return server, None if accepted is None else max(0.0, accepted - server.started)

    def wait_ready(self, server: Server) -> tuple[float | None, str]:
        """Poll /ping until 200: (seconds from start, or None; what the last poll saw)."""
        seen, next_state = "no answer", time.monotonic() + 1
        while not server.error and time.time() - server.started < self.ping_deadline_s:
            try:
                answer = host.request(server.port, "GET", "/ping", timeout=PING_TIMEOUT_S)
                if answer.status == 200:
                    return time.time() - server.started, "200"
                seen = f"{answer.status} {answer.body[:100].decode(errors='replace')}".strip()
            except (OSError, http.client.HTTPException) as error:
                seen = describe(error)
            if time.monotonic() > next_state:
                next_state = time.monotonic() + 1
                running, code = self.state(server.container)
                if not running:
                    server.error = f"exited with code {code}: {self.logs(server.container)}"
            time.sleep(0.2)
        return None, server.error or seen

    def serve_items(self, model_dir: Path) -> None:
        server, accept_s = self.start(model_dir)
        ready_s, seen = self.wait_ready(server)
        if server.error:
            self.add("serve starts", FAIL, server.error, server.start_seconds)
        else:
            self.add("serve starts", PASS, f"docker run IMAGE serve, model mounted at /opt/ml/model, port {SERVING_PORT}",
                     server.start_seconds)
        if accept_s is None:
            self.add("TCP accept within 250 ms of start", FAIL, "never accepted a connection on port 8080")
        else:
            self.add("TCP accept within 250 ms of start", PASS if accept_s <= ACCEPT_BUDGET_S else WARN,
                     f"first connection accepted {accept_s * 1000:.0f} ms after start"
                     + ("" if accept_s <= ACCEPT_BUDGET_S else " (SageMaker asks for 250 ms; it retries pings)"),
                     accept_s)
        if ready_s is None:
            self.add("/ping 200 within 4 minutes", FAIL, f"no 200 within {self.ping_deadline_s:g} s; last: {seen}",
                     time.time() - server.started)
            for name in ("POST /invocations image/jpeg", "POST /invocations image/png",
                         "POST /invocations application/x-image", "6 MB+ body", "unknown headers ignored"):
                self.add(name, SKIP, "the server never became ready")
        else:
            self.ping_item(server, ready_s)
            self.invocation_items(server)
        self.sigterm_item(server)

    def ping_item(self, server: Server, ready_s: float) -> None:
        latencies, problems = [], []
        for _ in range(PINGS):
            try:
                answer = host.request(server.port, "GET", "/ping", timeout=PING_TIMEOUT_S)
                latencies.append(answer.seconds)
                if answer.status != 200:
                    problems.append(str(answer.status))
            except (OSError, http.client.HTTPException) as error:
                problems.append(describe(error))
        timing = (f"first 200 after {ready_s:.1f} s; {PINGS} pings: p50 {statistics.median(latencies) * 1000:.0f} ms, "
                  f"max {max(latencies) * 1000:.0f} ms" if latencies else f"first 200 after {ready_s:.1f} s")
        if problems:
            self.add("/ping 200 within 4 minutes", FAIL, f"{timing}; then {', '.join(problems[:3])}", ready_s)
        else:
            self.add("/ping 200 within 4 minutes", PASS, timing, ready_s)

    def invoke(self, server: Server, body: bytes, content_type: str, **headers: str) -> host.Answer | str:
        try:
            return host.request(server.port, "POST", "/invocations", body=body,
                           headers={"Content-Type": content_type, "Accept": "application/json", **headers})
        except (OSError, http.client.HTTPException) as error:
            return describe(error)

    def invocation_items(self, server: Server) -> None:
        for content_type, body in (("image/jpeg", self.jpeg), ("image/png", self.png),
                                   ("application/x-image", self.jpeg)):
            self.add_answer(f"POST /invocations {content_type}", self.invoke(server, body, content_type))
        big = self.jpeg + bytes(BIG_BODY_BYTES - len(self.jpeg))  # a JPEG with trailing padding
        self.big_body_item(server, self.invoke(server, big, "image/jpeg"))
        headers = {"X-Amzn-SageMaker-Custom-Attributes": "contract-check=1",
                   f"X-Contract-Check-{uuid.uuid4().hex[:6]}": uuid.uuid4().hex}
        self.add_answer("unknown headers ignored", self.invoke(server, self.jpeg, "image/jpeg", **headers),
                        note=f"with {', '.join(headers)}")

    def add_answer(self, name: str, answer: host.Answer | str, note: str = "") -> None:
        if isinstance(answer, str):
            self.add(name, FAIL, f"no answer: {answer}")
            return
        detail = f"{answer.status} {answer.content_type or '(no Content-Type)'}"
        if not 200 <= answer.status < 300:
            detail += f": {answer.body[:160].decode(errors='replace')}"
        self.add(name, PASS if 200 <= answer.status < 300 else FAIL, f"{detail}{'; ' + note if note else ''}",
                 answer.seconds)

    def big_body_item(self, server: Server, answer: host.Answer | str) -> None:
        name, size = "6 MB+ body", f"{BIG_BODY_BYTES / MEGABYTE:.0f} MB"
        try:
            alive = host.request(server.port, "GET", "/ping", timeout=PING_TIMEOUT_S).status == 200
        except (OSError, http.client.HTTPException):
            alive = False
        after = "/ping 200 afterwards" if alive else "/ping no longer 200 afterwards"
        if isinstance(answer, str):
            self.add(name, WARN if alive else FAIL, f"{size}: connection closed without an answer ({answer}); {after}")
        elif answer.status >= 500 or not alive:
            self.add(name, FAIL, f"{size}: {answer.status}; {after}", answer.seconds)
        else:
            expected = "" if answer.status == 413 else " (413 expected; SageMaker refuses > 6 MB before the container)"
            self.add(name, PASS, f"{size}: {answer.status}{expected}; {after}", answer.seconds)

    def sigterm_item(self, server: Server) -> None:
        if server.error:
            self.add(f"SIGTERM within {self.stop_timeout_s} s", SKIP, "the server is not running")
            return
        started = time.monotonic()
        docker("stop", "-t", str(self.stop_timeout_s), server.container, timeout=self.stop_timeout_s + 60)
        seconds = time.monotonic() - started
        running, code = self.state(server.container)
        name = f"SIGTERM within {self.stop_timeout_s} s"
        if running or code == 137 or seconds >= self.stop_timeout_s:
            self.add(name, FAIL, f"still running {self.stop_timeout_s} s after SIGTERM; killed (exit code {code})",
                     seconds)
        elif code in (0, 143):
            self.add(name, PASS, f"exited with code {code} after {seconds:.1f} s", seconds)
        else:
            self.add(name, WARN, f"exited with code {code} after {seconds:.1f} s (0 or 143 expected)", seconds)

    def bind_port_item(self, model_dir: Path, labels: Mapping[str, str]) -> None:
        name = "SAGEMAKER_BIND_TO_PORT"
        if str(labels.get(BIND_LABEL, "")).lower() != "true":
            self.add(name, SKIP, f"not declared (no LABEL {BIND_LABEL}=true): not usable in inference pipelines")
            return
        env = {"SAGEMAKER_BIND_TO_PORT": str(BIND_PORT), "SAGEMAKER_SAFE_PORT_RANGE": "9091-9099"}
        server, _ = self.start(model_dir, port=BIND_PORT, env=env)
        ready_s, seen = self.wait_ready(server)
        docker("rm", "-f", server.container)
        if ready_s is None:
            self.add(name, FAIL, f"declared, but no /ping 200 on port {BIND_PORT}: {seen}")
        else:
            self.add(name, PASS, f"/ping 200 on port {BIND_PORT} after {ready_s:.1f} s", ready_s)

    def no_argument_items(self, model_dir: Path | None, train: bool) -> None:
        why = "(SageMaker passes train/serve; SDK v3 local mode passes nothing)"
        name = "no argument + training config: trains"
        if not train:
            self.add(name, SKIP, "--skip-train")
        else:
            base = write_opt_ml(self.workdir / "no-argument", self.hyperparameters)
            code, seconds, tail = self.train(base, command=())
            files = self.artifact(base)
            if code == 0 and files:
                self.add(name, PASS, f"exit code 0, {len(files)} file(s) in /opt/ml/model", seconds)
            else:
                self.add(name, WARN, f"exit code {code}, {len(files)} file(s) in /opt/ml/model; {tail} {why}", seconds)
        name = "no argument, no config: serves"
        if model_dir is None:
            self.add(name, SKIP, "no model to serve")
            return
        server, _ = self.start(model_dir, command=())
        ready_s, seen = self.wait_ready(server)
        docker("rm", "-f", server.container)
        if ready_s is None:
            self.add(name, WARN, f"no /ping 200: {seen} {why}")
        else:
            self.add(name, PASS, f"/ping 200 after {ready_s:.1f} s", ready_s)


def run_check(image: str, *, hyperparameters: Mapping[str, str] | None = None,
              broken_hyperparameters: Mapping[str, str] | None = None, train_timeout_s: float = 900,
              skip_train: bool = False, model_dir: Path | str | None = None,
              ping_deadline_s: float = PING_DEADLINE_S, stop_timeout_s: int = STOP_TIMEOUT_S,
              progress: Callable[[Item], None] | None = None) -> Report:
    """Run every check on ``image`` and return the report (``progress`` sees each item as it ends).

    ``model_dir`` (with ``skip_train``) is served instead of a freshly trained artifact; with
    ``skip_train`` alone an empty model folder is served. ``ping_deadline_s`` and
    ``stop_timeout_s`` are SageMaker's 4 minutes and 30 s unless a test needs a shorter wait.
    """
    if model_dir is not None and not skip_train:
        raise ValueError("a model folder is only served with skip_train (--skip-train)")
    if model_dir is not None and not Path(model_dir).is_dir():
        raise ValueError(f"model folder {model_dir} does not exist")
    with tempfile.TemporaryDirectory(prefix="contract-check-", ignore_cleanup_errors=True) as tmp:
        checker = Checker(image, Path(tmp), hyperparameters=hyperparameters or {},
                          broken_hyperparameters=broken_hyperparameters or dict(DEFAULT_BROKEN_HP),
                          train_timeout_s=train_timeout_s, ping_deadline_s=ping_deadline_s,
                          stop_timeout_s=stop_timeout_s, progress=progress)
        try:
            labels = checker.image_items()
            if skip_train:
                for name in ("train exits 0", "artifact written", "failure file on a broken config"):
                    checker.add(name, SKIP, "--skip-train")
                served = Path(model_dir).resolve() if model_dir is not None else Path(tmp) / "empty-model"
                served.mkdir(exist_ok=True)
            else:
                served = checker.train_items()
                checker.broken_config_item()
            if served is None:
                for name in ("serve starts", "TCP accept within 250 ms of start", "/ping 200 within 4 minutes",
                             "POST /invocations image/jpeg", "POST /invocations image/png",
                             "POST /invocations application/x-image", "6 MB+ body", "unknown headers ignored",
                             f"SIGTERM within {stop_timeout_s} s", "SAGEMAKER_BIND_TO_PORT"):
                    checker.add(name, SKIP, "no model to serve: training wrote none (or use --skip-train)")
            else:
                checker.serve_items(served)
                checker.bind_port_item(served, labels)
            checker.no_argument_items(served, train=not skip_train)
        finally:
            checker.close()
        return checker.report


# --- the command line ------------------------------------------------------------------------


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``check`` on the deploy CLI's subparsers; its handler is :func:`cmd_check`."""
    parser = subparsers.add_parser(
        "check", help="check an image against the SageMaker container contract (Docker on this machine)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", metavar="IMAGE", help="a local image tag or ID (pull it first)")
    parser.add_argument("--hp", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="hyperparameter for the training runs (repeatable; default: none), written as a string")
    parser.add_argument("--broken-hp", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="hyperparameter that must make training fail (repeatable; default: epochs=not-a-number)")
    parser.add_argument("--timeout", type=float, default=900, metavar="SECONDS",
                        help="limit for each training run (default: %(default)g)")
    parser.add_argument("--skip-train", action="store_true", help="serving checks only (a serving-only image)")
    parser.add_argument("--model-dir", type=Path, help="with --skip-train: the model folder to serve "
                                                       "(default: an empty one)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every docker command")
    return parser


def cmd_check(args: argparse.Namespace, session: Any = None, environ: Mapping[str, str] | None = None) -> int:
    """The ``check`` subcommand (``session`` and ``environ`` are unused: it needs no AWS).

    Each item goes to stderr as it ends (a run takes minutes); the report goes to stdout.
    """
    def progress(item: Item) -> None:
        print(f"{item.status} {item.name} ({format_seconds(item.seconds)}): {item.detail}", file=sys.stderr,
              flush=True)

    report = run_check(args.image, hyperparameters=dict(args.hp), broken_hyperparameters=dict(args.broken_hp),
                       train_timeout_s=args.timeout, skip_train=args.skip_train, model_dir=args.model_dir,
                       progress=progress)
    print(json.dumps(report.to_dict(), indent=2) if args.json else render_table(report))
    return report.exit_code


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m deploy.check IMAGE`` without the rest of the deploy CLI."""
    parser = argparse.ArgumentParser(prog="python -m deploy")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check", *(list(argv) if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_check(args)
    except (CheckError, ValueError) as error:
        print(f"{parser.prog} check: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
