"""The real CPU image against hostile requests and clients, and mis-packaged models.

Hostile requests run against a container limited to 2 GB, as an ml.m5.large-sized host would be
after the platform's own share: requests whose few kilobytes of PNG decode to gigabytes get a
clear 4xx in seconds, requests that may decode are decoded under the memory gate, and the server
stays alive and healthy throughout. Hostile clients (idle, trickling, flooding) meet the
server's default limits and deadlines while valid requests beside them are answered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from classifier import artifact

from artifacts import constant_artifact
from containers import docker, image_for, serving
from imagedata import encode
from ports import read_until_closed

pytestmark = pytest.mark.container
SIDE = 6324  # SIDE * SIDE is just under the default 40-megapixel limit for one image


@pytest.fixture(scope="module")
def one_bit_png() -> bytes:
    return encode(Image.new("1", (SIDE, SIDE)), "PNG")  # about 5 KB, 120 MB as RGB


@pytest.fixture(scope="module")
def sixteen_bit_png() -> bytes:
    return encode(Image.new("I;16", (SIDE, SIDE)), "PNG")  # about 80 KB


def instances(body: bytes, count: int) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(body).decode()}] * count}).encode()


def still_healthy(url: str, container: str) -> None:
    state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
    assert state["Running"] and not state["OOMKilled"], state
    assert httpx.get(f"{url}/ping", timeout=5).status_code == 200


def test_decompression_bombs_get_a_clear_413_and_the_server_stays_up(tmp_path: Path, one_bit_png: bytes,
                                                                    sixteen_bit_png: bytes) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with serving(image_for("cpu"), "--memory", "2g", "-v", f"{model_dir}:/opt/ml/model:ro") as served:
        for body, count in ((one_bit_png, 32), (one_bit_png, 64), (sixteen_bit_png, 32)):
            started = time.monotonic()
            response = httpx.post(f"{served.url}/invocations", content=instances(body, count),
                                  headers={"Content-Type": "application/json"}, timeout=60)
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "images_too_large"
            assert f"{count} images decode to {count * SIDE * SIDE} pixels" in response.json()["error"]["message"]
            assert time.monotonic() - started < 10
        still_healthy(served.url, served.container)


def test_images_at_the_limits_are_decoded_within_the_memory_bound(tmp_path: Path, one_bit_png: bytes,
                                                                  sixteen_bit_png: bytes) -> None:
    """Requests at every limit at once (one image at the pixel limit, a request at the pixel budget),
    several side by side: each answered, none kills the 2 GB container."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    requests = [(sixteen_bit_png, "image/png"), (one_bit_png, "image/png"),
                (instances(sixteen_bit_png, 4), "application/json"), (instances(one_bit_png, 4), "application/json")]
    with serving(image_for("cpu"), "--memory", "2g", "-v", f"{model_dir}:/opt/ml/model:ro") as served:
        def post(request: tuple[bytes, str]) -> httpx.Response:
            return httpx.post(f"{served.url}/invocations", content=request[0],
                              headers={"Content-Type": request[1]}, timeout=120)

        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            responses = list(pool.map(post, requests))
        for response in responses:
            assert response.status_code == 200, response.text
        assert len(responses[2].json()["predictions"]) == 4
        still_healthy(served.url, served.container)


def wait_for_failed_ping(url: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(f"{url}/ping", timeout=2)
            if response.json().get("status") == "failed":
                assert response.status_code == 503
                return response.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the load never failed"
        time.sleep(0.2)


def one_folder_deep(model_dir: Path) -> None:
    constant_artifact(model_dir / "model", ("cat", "dog"), "dog")


def bare_weights(model_dir: Path) -> None:
    model_dir.mkdir(parents=True)
    torch.save({"weight": torch.zeros(2, 2)}, model_dir / "model.pth")


def empty_manifest(model_dir: Path) -> None:
    model_dir.mkdir(parents=True)
    (model_dir / artifact.MANIFEST_FILE).write_text("")


@pytest.mark.parametrize(("package", "reason"), [
    (one_folder_deep, "The artifact is one folder down, in model/"),
    (bare_weights, "it holds: model.pth. A bare weights file"),
    (empty_manifest, "manifest.json is not valid JSON"),
])
def test_a_mis_packaged_model_is_unhealthy_with_the_reason_not_served_as_imagenet(tmp_path: Path, package,
                                                                                  reason: str) -> None:
    package(tmp_path / "model")
    container = docker("run", "-d", "-p", "127.0.0.1::8080", "-v", f"{tmp_path / 'model'}:/opt/ml/model:ro",
                       image_for("cpu"), "serve").stdout.strip()
    try:
        port = docker("port", container, "8080/tcp").stdout.splitlines()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        body = wait_for_failed_ping(url)
        assert reason in body["reason"], body
        invoked = httpx.post(f"{url}/invocations", content=encode(Image.new("RGB", (8, 8))),
                             headers={"Content-Type": "image/png"}, timeout=10)
        assert invoked.status_code == 503, invoked.text
    finally:
        docker("rm", "-f", container, check=False)


def test_idle_trickling_and_flooding_clients_meet_the_default_limits(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    photo = encode(Image.new("RGB", (640, 480), "teal"), "JPEG")
    with serving(image_for("cpu"), "-v", f"{model_dir}:/opt/ml/model:ro") as served:
        port = int(served.url.rsplit(":", 1)[1])

        def connect(first_bytes: bytes) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(first_bytes)
            return sock

        idle = [connect(b"") for _ in range(20)]
        slow_heads = [connect(b"POST /invocations HTTP/1.1\r\nHost: x\r\n") for _ in range(3)]
        slow_bodies = [connect(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                               b"Content-Length: 200000\r\n\r\n" + photo[:1000]) for _ in range(3)]
        try:
            started = time.monotonic()
            flood = asyncio.run(post_together(served.url, photo, 300))
            statuses = [response.status_code for response in flood]
            assert set(statuses) <= {200, 503}, statuses
            for refused in (response for response in flood if response.status_code == 503):
                assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"
            # The first 64 requests in progress are admitted (the slow bodies hold three of those places).
            assert statuses.count(200) >= 64 - len(slow_bodies), statuses
            assert httpx.get(f"{served.url}/ping", timeout=5).status_code == 200
            for sock in idle:
                assert read_until_closed(sock, 20) == b""
            for sock in slow_heads:
                assert read_until_closed(sock, 20).startswith(b"HTTP/1.1 408 ")
            for sock in slow_bodies:
                answer = read_until_closed(sock, 45)
                assert answer.startswith(b"HTTP/1.1 408 ") and b"the body did not arrive within 30 s" in answer
            assert time.monotonic() - started < 75  # the last: 30 s body deadline, then 10 s idle
        finally:
            for sock in idle + slow_heads + slow_bodies:
                sock.close()
        still_healthy(served.url, served.container)


async def post_together(url: str, body: bytes, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(client.post(f"{url}/invocations", content=body,
                                                  headers={"Content-Type": "image/jpeg"}) for _ in range(count)))

