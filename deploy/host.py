"""SageMaker's side of the container contract, played on this machine with Docker: the
``/opt/ml`` layout a training job sees, a server container published on a free port and waited
for until ``/ping`` answers, and a small learnable image set to train on. ``classifier-deploy
check``, the benchmarks and the tests all run the image through these.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

# Each class is a shape in a colour family; position, size, hue and background vary per image.
CLASSES = {
    "circle": (220, 40, 40),
    "square": (40, 180, 40),
    "triangle": (40, 60, 220),
}
# How SageMaker describes a File-mode channel in inputdataconfig.json.
CHANNEL_CONFIG = {"ContentType": "application/x-image", "TrainingInputMode": "File",
                  "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}


class DockerError(RuntimeError):
    """A docker command failed, timed out, or Docker is not installed."""


class DockerTimeout(DockerError):
    pass


# --- images ------------------------------------------------------------------------------------


def render(class_name: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One image of ``class_name`` (a key of :data:`CLASSES`)."""
    background = tuple(rng.randint(90, 170) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in CLASSES[class_name])
    extent = rng.randint(size // 3, size * 3 // 4)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    if class_name == "circle":
        draw.ellipse(box, fill=colour)
    elif class_name == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image


def write_image_folder(root: Path, per_class: int, *, seed: int, size: int = 64) -> Path:
    """``root/<class>/<n>.png`` for every class in :data:`CLASSES`."""
    rng = random.Random(seed)
    for class_name in CLASSES:
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            render(class_name, rng, size).save(folder / f"{index:03d}.png")
    return root


def encode(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


# --- /opt/ml -----------------------------------------------------------------------------------


def write_training_config(base: Path, hyperparameters: Mapping[str, object], channels: Sequence[str], *,
                          current_host: str = "algo-1", hosts: Sequence[str] = ("algo-1",),
                          instance_type: str = "ml.m5.large") -> Path:
    """SageMaker's three config files under ``base/input/config``, as the platform writes them
    (every hyperparameter a string)."""
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hyperparameters.items()}))
    (config / "inputdataconfig.json").write_text(json.dumps({name: CHANNEL_CONFIG for name in channels}))
    (config / "resourceconfig.json").write_text(json.dumps({
        "current_host": current_host, "current_instance_type": instance_type,
        "current_group_name": "homogeneousCluster", "hosts": list(hosts), "network_interface_name": "eth0",
        "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": instance_type,
                             "hosts": list(hosts)}],
    }))
    return base


# --- Docker and the server -------------------------------------------------------------------------


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``docker ARGS``; with ``check``, a failure raises :class:`DockerError` with its stderr."""
    try:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise DockerError("the docker command is not installed") from None
    except subprocess.TimeoutExpired:
        raise DockerTimeout(f"docker {args[0]} did not finish within {timeout:g} s") from None
    if check and result.returncode != 0:
        raise DockerError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


LOWEST_PORT = 10_000
_given_ports: set[int] = set()
_ports_lock = threading.Lock()
_choose = random.Random()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands outgoing connections (Linux's default where it cannot be read)."""
    try:
        low, high = (int(value) for value in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def ports_outside(ephemeral: tuple[int, int]) -> list[range]:
    """The ports from LOWEST_PORT up that are not in ``ephemeral``."""
    low, high = ephemeral
    return [ports for ports in (range(LOWEST_PORT, low), range(max(high + 1, LOWEST_PORT), 65536)) if ports]


def _nth_port(choices: list[range], index: int) -> int:
    for ports in choices:
        if index < len(ports):
            return ports[index]
        index -= len(ports)
    raise IndexError(index)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now and that this process has not given
    before, outside the range the kernel hands outgoing connections: a port from that range could
    be taken by some client's socket between this check and the server binding it. Where that
    range leaves nothing, the kernel's choice."""
    choices = ports_outside(ephemeral_range())
    count = sum(len(ports) for ports in choices)
    with _ports_lock:
        for _ in range(1000):
            if count:
                port = _nth_port(choices, _choose.randrange(count))
                if port in _given_ports or not _bindable(port):
                    continue
            else:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                if port in _given_ports:
                    continue
            _given_ports.add(port)
            return port
    raise RuntimeError("no free TCP port found outside the ephemeral range")


def wait_for_ping(url: str, timeout_s: float = 120, describe: Callable[[], str] = str,
                  exited: Callable[[], bool] = lambda: False) -> None:
    """Poll ``url``/ping until it answers 200; raise with ``describe()`` (e.g. logs) on timeout, or
    at once when ``exited()`` says the server is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        if exited():
            raise RuntimeError(f"the server exited before {url}/ping answered 200\n{describe()}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no 200 from {url}/ping within {timeout_s} s\n{describe()}")
        time.sleep(0.2)


@dataclass(frozen=True)
class Served:
    url: str
    container: str
    seconds_to_ready: float


@contextlib.contextmanager
def serving(image: str, *docker_args: str, port: int = 8080, command: Sequence[str] = ("serve",),
            timeout_s: float = 120) -> Iterator[Served]:
    """Run the image's server with ``port`` published on a random 127.0.0.1 port, until ready;
    the container is removed afterwards."""
    started = time.monotonic()
    container = docker("run", "-d", "-p", f"127.0.0.1::{port}", *docker_args, image, *command).stdout.strip()
    try:
        host_port = docker("port", container, f"{port}/tcp").stdout.splitlines()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{host_port}"

        def logs() -> str:
            result = docker("logs", container, check=False)
            return result.stdout + result.stderr

        wait_for_ping(url, timeout_s, describe=logs)
        yield Served(url, container, time.monotonic() - started)
    finally:
        docker("rm", "-f", container, check=False)


def direct_url(container: str, port: int = 8080) -> str | None:
    """The container's own address on Docker's bridge network, if this host can reach it.

    SageMaker's front end talks to the container directly; measuring through Docker's userland
    port proxy would copy every byte through one more process."""
    address = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container,
                     check=False).stdout.strip()
    if not address:
        return None
    url = f"http://{address}:{port}"
    try:
        return url if httpx.get(f"{url}/ping", timeout=2).status_code == 200 else None
    except httpx.TransportError:
        return None


# --- what SageMaker's front end sees -----------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    seconds: float


def request(port: int, method: str, path: str, *, body: bytes | None = None,
            headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> Answer:
    """One HTTP request to 127.0.0.1; transport failures raise ``OSError``/``HTTPException``."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
        except OSError:
            # A server may answer (413) and close before reading a large body: read what it said.
            if body is None:
                raise
        response = connection.getresponse()
        data = response.read()
        return Answer(response.status, response.getheader("Content-Type", ""), data, time.monotonic() - started)
    finally:
        connection.close()


def connection_accepted(port: int) -> bool:
    """Whether something in a container took a connection on its published ``port``: Docker's
    port proxy accepts every connection and closes it at once while nothing inside listens, so a
    connection that stays open, or answers, is the server's."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
    except OSError:
        return False
    with sock:
        try:
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            sock.settimeout(1.0)
            return bool(sock.recv(1))
        except TimeoutError:
            return True  # the connection stays open: the server has it
        except OSError:
            return False


def parse_docker_time(stamp: str) -> float | None:
    """Docker's UTC RFC 3339 time with nanoseconds (``2024-05-01T10:00:00.123456789Z``) as a timestamp."""
    head, _, fraction = stamp.strip().rstrip("Z").partition(".")
    try:  # Python 3.11 wants at most microseconds
        return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00").timestamp()
    except ValueError:
        return None


def started_at(container: str, fallback: float) -> float:
    """The container's start as wall-clock time (Docker's State.StartedAt), else ``fallback``.

    The daemon's clock is this machine's unless Docker runs in a VM (Docker Desktop): a time
    before ``fallback`` (when ``docker start`` was invoked) or after now means another clock.
    """
    value = parse_docker_time(docker("inspect", "-f", "{{.State.StartedAt}}", container, check=False).stdout)
    return value if value is not None and fallback <= value <= time.time() else fallback
