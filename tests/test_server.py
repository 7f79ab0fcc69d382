"""The real server process: ``python -m serve`` under uvicorn, over real sockets, under load."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagedata import CLASSES, encode, render
from ports import free_port
from server_process import ROOT, server


def shapes(count: int) -> list[bytes]:
    import random

    rng = random.Random(4)
    names = sorted(CLASSES)
    return [encode(render(names[i % 3], rng)) for i in range(count)]


async def post_all(url: str, bodies: list[tuple[bytes, str]], timeout: float = 60) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(
            client.post(f"{url}/invocations", content=body, headers={"Content-Type": kind}) for body, kind in bodies
        ))


def test_sigterm_when_idle_exits_zero(tiny_artifact: Path) -> None:
    with server(tiny_artifact) as (url, process):
        response = httpx.post(f"{url}/invocations", content=encode(Image.new("RGB", (50, 50), "blue")),
                              headers={"Content-Type": "application/x-image"}, timeout=30)
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_fifty_concurrent_mixed_requests(tiny_artifact: Path) -> None:
    good = shapes(30)
    with server(tiny_artifact) as (url, _):
        expected = [httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": "image/png"},
                               timeout=30).json()["predictions"][0]["label"] for body in good]
        bad = [(b"not an image", "image/png"), (b"{}", "text/plain"), (b"{broken", "application/json"),
               (good[0][:100], "image/png"), (b"", "image/jpeg")] * 4
        mixed = [(body, "image/png") for body in good] + bad
        responses = asyncio.run(post_all(url, mixed))
        for response in responses[:30]:
            assert response.status_code == 200, response.text
        assert [r.json()["predictions"][0]["label"] for r in responses[:30]] == expected
        for response in responses[30:]:
            assert 400 <= response.status_code < 500, response.text
            assert response.json()["error"]["code"]
        assert httpx.get(f"{url}/ping", timeout=2).status_code == 200


def test_concurrent_requests_are_batched_with_unbatched_results(tiny_artifact: Path) -> None:
    bodies = shapes(12)
    with server(tiny_artifact, CLASSIFIER_MAX_BATCH_DELAY_MS="50") as (url, _):
        alone = [httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": "image/png"},
                            timeout=30) for body in bodies]
        together = asyncio.run(post_all(url, [(body, "image/png") for body in bodies]))
        batch_sizes = [int(re.search(r'batch of (\d+)', r.headers["server-timing"]).group(1)) for r in together]
        assert max(batch_sizes) > 1, batch_sizes
        assert all(int(re.search(r'batch of (\d+)', r.headers["server-timing"]).group(1)) == 1 for r in alone)
        for single, batched in zip(alone, together):
            a, b = single.json()["predictions"], batched.json()["predictions"]
            assert [p["label"] for p in a] == [p["label"] for p in b]
            assert [p["probability"] for p in a] == pytest.approx([p["probability"] for p in b], abs=1e-4)


def test_sigterm_under_load_loses_no_accepted_request(tiny_artifact: Path) -> None:
    bodies = [(body, "image/png") for body in shapes(10)]
    with server(tiny_artifact, CLASSIFIER_MAX_BATCH_DELAY_MS="400") as (url, process):

        async def scenario() -> list[httpx.Response]:
            requests = asyncio.ensure_future(post_all(url, bodies))
            await asyncio.sleep(0.2)  # all sent and waiting in the batcher's queue
            process.send_signal(signal.SIGTERM)
            return await requests

        responses = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * len(bodies)
        assert process.wait(timeout=30) == 0


def test_a_slow_body_does_not_block_ping(tiny_artifact: Path) -> None:
    with server(tiny_artifact) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"\x89PNG")
            started = time.monotonic()
            assert httpx.get(f"{url}/ping", timeout=2).status_code == 200
            assert time.monotonic() - started < 1.0
            assert httpx.post(f"{url}/invocations", content=shapes(1)[0], headers={"Content-Type": "image/png"},
                              timeout=10).status_code == 200


def test_overload_gets_503_with_retry_after(tiny_artifact: Path) -> None:
    bodies = [(body, "image/png") for body in shapes(20)]
    with server(tiny_artifact, CLASSIFIER_MAX_QUEUE="2", CLASSIFIER_MAX_BATCH_DELAY_MS="300") as (url, _):
        responses = asyncio.run(post_all(url, bodies))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes, codes
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/ping", timeout=2).status_code == 200


def test_several_workers(tiny_artifact: Path) -> None:
    with server(tiny_artifact, SAGEMAKER_MODEL_SERVER_WORKERS="2") as (url, process):
        responses = asyncio.run(post_all(url, [(body, "image/png") for body in shapes(8)]))
        assert [r.status_code for r in responses] == [200] * 8
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0


def test_a_failed_load_answers_503_with_the_reason_then_exits_1(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"weights without a manifest")
    port = free_port()
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "SM_MODEL_DIR": str(tmp_path), "CLASSIFIER_HOST": "127.0.0.1",
               "SAGEMAKER_BIND_TO_PORT": str(port), "CLASSIFIER_FAILED_EXIT_S": "10"}
    process = subprocess.Popen([sys.executable, "-m", "serve"], env=environ, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                ping = httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2)
                if ping.json()["status"] == "failed":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "no failed /ping within 60 s"
            time.sleep(0.1)
        assert ping.status_code == 503 and "model.pth" in ping.json()["reason"]
        assert str(tmp_path) not in ping.json()["reason"]
        assert process.wait(timeout=60) == 1
        assert "the server exits in 10 s: the model failed to load" in process.communicate()[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_with_several_workers_a_failed_load_stops_the_server_with_status_1(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"weights without a manifest")
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "SM_MODEL_DIR": str(tmp_path), "CLASSIFIER_HOST": "127.0.0.1",
               "SAGEMAKER_BIND_TO_PORT": str(free_port()), "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    process = subprocess.run([sys.executable, "-m", "serve"], env=environ, cwd=ROOT, capture_output=True, text=True,
                             timeout=120, check=False)
    assert process.returncode == 1, process.stdout + process.stderr
    assert "the model failed to load" in process.stdout + process.stderr


def test_startup_imports_run_no_full_garbage_collection(tiny_artifact: Path) -> None:
    """The server's imports run with the cyclic collector off and freeze what they made, so no
    full collection walks the growing heap while the server starts; the collector is on after."""
    code = """
import gc, json, sys
from pathlib import Path
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
from serve.server import build
from serve.settings import Settings
build(Settings(model_dir=Path(sys.argv[1]), default_model=False))
seen = {"full": len(full), "enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "outside": len(gc.get_objects()),
        "torch": "torch" in sys.modules}
from serve.server import collector_paused
gc.disable()
with collector_paused():
    pass
seen["stays_off"] = not gc.isenabled()
print(json.dumps(seen))
"""
    result = subprocess.run([sys.executable, "-c", code, str(tiny_artifact)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["torch"]  # the heavy imports did happen inside build()
    assert seen["full"] == 0
    # What the imports made is frozen: far more than what the app made after them.
    assert seen["enabled"] and seen["frozen"] > 10 * seen["outside"]
    assert seen["stays_off"]  # a collector that was off before stays off
