"""The HTTP app in-process: health states, invocations and every error it answers with."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from imagedata import encode
from PIL import Image

from serve.app import create_app
from serve.predictor import Predictor
from serve.settings import Settings


def wait_for_ping(client: TestClient, status: int, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/ping")
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response.json()
        time.sleep(0.02)


@pytest.fixture
def settings(tiny_artifact: Path) -> Settings:
    return Settings(model_dir=tiny_artifact, default_model=False, top_k=2, max_body_bytes=50_000)


def client_for(settings: Settings, loader: Callable[[], Predictor]) -> TestClient:
    return TestClient(create_app(settings, loader), raise_server_exceptions=False)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    loader = lambda: Predictor.load(settings.model_dir, allow_default=False, device="cpu")
    with client_for(settings, loader) as client:
        wait_for_ping(client, 200)
        yield client


def png(size: tuple[int, int] = (40, 40), colour: str = "red") -> bytes:
    return encode(Image.new("RGB", size, colour))


@pytest.mark.parametrize("content_type", ["image/png", "application/x-image", "image/jpeg"])
def test_invocations_return_top_k_labels(client: TestClient, content_type: str) -> None:
    body = png() if content_type != "image/jpeg" else encode(Image.new("RGB", (40, 40)), "JPEG")
    response = client.post("/invocations", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    predictions = response.json()["predictions"]
    assert len(predictions) == 2  # settings.top_k
    assert {p["label"] for p in predictions} <= {"circle", "square", "triangle"}
    assert predictions[0]["probability"] >= predictions[1]["probability"]
    assert {"label", "index", "probability"} == set(predictions[0])


def test_ping_is_503_while_loading_then_200(settings: Settings) -> None:
    release = threading.Event()

    def slow_loader() -> Predictor:
        release.wait(10)
        return Predictor.load(settings.model_dir, allow_default=False, device="cpu")

    with client_for(settings, slow_loader) as client:
        assert client.get("/ping").json() == {"status": "loading"}
        response = client.post("/invocations", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "model_not_ready"
        release.set()
        assert wait_for_ping(client, 200) == {"status": "ready"}


def test_failed_load_keeps_ping_unhealthy_with_the_reason(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path, default_model=False)
    loader = lambda: Predictor.load(tmp_path, allow_default=False, device="cpu")
    with client_for(settings, loader) as client:
        deadline = time.monotonic() + 10
        while (response := client.get("/ping")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "failed"
        assert "no model artifact" in body["reason"]


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported_media_type"),
        ({"Content-Type": "image/png"}, b"garbage", 400, "invalid_image"),
        ({"Content-Type": "image/png"}, b"", 400, "invalid_image"),
        ({"Content-Type": "image/png", "Accept": "text/html"}, png(), 406, "not_acceptable"),
        ({"Content-Type": "image/png"}, b"x" * 50_001, 413, "payload_too_large"),
    ],
)
def test_bad_requests_get_json_errors(client: TestClient, headers: dict, body: bytes, status: int, code: str) -> None:
    response = client.post("/invocations", content=body, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert client.get("/ping").status_code == 200


def test_oversized_body_without_content_length_is_refused(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 10_000

    response = client.post("/invocations", content=chunks(), headers={"Content-Type": "image/png"})
    assert response.status_code == 413


def test_prediction_errors_are_500_json_without_internals(settings: Settings) -> None:
    class Broken(Predictor):
        def predict(self, images, top_k):  # type: ignore[no-untyped-def]
            raise RuntimeError("secret internal detail")

    def loader() -> Predictor:
        good = Predictor.load(settings.model_dir, allow_default=False, device="cpu")
        broken = Broken(good.model, good.manifest, good.device)
        broken.warm_up = lambda: None  # type: ignore[method-assign]
        return broken

    with client_for(settings, loader) as client:
        wait_for_ping(client, 200)
        response = client.post("/invocations", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 500
        assert response.json() == {"error": {"code": "internal_error", "message": "Internal Server Error"}}
        assert "secret" not in response.text
        assert client.get("/ping").status_code == 200


def test_unknown_headers_are_ignored(client: TestClient) -> None:
    headers = {"Content-Type": "image/png", "X-Amzn-SageMaker-Custom-Attributes": "anything", "X-Other": "1"}
    assert client.post("/invocations", content=png(), headers=headers).status_code == 200
