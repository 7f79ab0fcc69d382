"""The HTTP app in-process: health states, invocations and every error it answers with."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.admission import SpooledBody
from serve.app import create_app
from serve.predictor import Predictor
from serve.service import load_with_retries, public_reason
from serve.settings import Settings

from imagedata import encode


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
        def infer(self, batch, threads=None):  # type: ignore[no-untyped-def]
            raise RuntimeError("secret internal detail")

    def loader() -> Predictor:
        good = Predictor.load(settings.model_dir, allow_default=False, device="cpu", jit=False)
        broken = Broken(good.model, good.manifest, good.device)
        # No warm-up pass, nor passes timed for the batch bound: only requests meet the failure.
        broken.warm_up = lambda threads=None: None  # type: ignore[method-assign]
        broken.time_pass = lambda threads, batch=1, runs=2: 1.0  # type: ignore[method-assign]
        return broken

    with client_for(settings, loader) as client:
        wait_for_ping(client, 200)
        response = client.post("/invocations", content=png(), headers={"Content-Type": "image/png",
                                                                         "X-Request-Id": "trace-500"})
        assert response.status_code == 500
        assert response.json() == {"error": {"code": "internal_error", "message": "Internal Server Error"}}
        assert "secret" not in response.text
        assert response.headers["x-request-id"] == "trace-500"
        assert client.get("/ping").status_code == 200
        assert 'classifier_requests_total{path="/invocations",status="500"} 1.0' in client.get("/metrics").text


def test_unknown_headers_are_ignored(client: TestClient) -> None:
    headers = {"Content-Type": "image/png", "X-Amzn-SageMaker-Custom-Attributes": "anything", "X-Other": "1"}
    assert client.post("/invocations", content=png(), headers=headers).status_code == 200


def b64png(colour: str = "red") -> str:
    import base64

    return base64.b64encode(png(colour=colour)).decode()


def test_json_instances_and_csv_and_npy_answers(client: TestClient) -> None:
    import io
    import json

    import numpy as np

    body = json.dumps({"instances": [{"b64": b64png("red")}, {"b64": b64png("blue")}]})
    many = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert many.status_code == 200, many.text
    assert len(many.json()["predictions"]) == 2 and len(many.json()["predictions"][0]) == 2
    as_csv = client.post("/invocations", content=body, headers={"Content-Type": "application/json", "Accept": "text/csv"})
    assert as_csv.headers["content-type"].startswith("text/csv") and len(as_csv.text.splitlines()) == 2
    logits = client.post("/invocations", content=body,
                         headers={"Content-Type": "application/json", "Accept": "application/x-npy"})
    array = np.load(io.BytesIO(logits.content))
    assert array.shape == (2, 3) and array.dtype == np.float32

    tensor = io.BytesIO()
    np.save(tensor, np.zeros((2, 3, 32, 32), dtype=np.float32))
    from_tensor = client.post("/invocations", content=tensor.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert from_tensor.status_code == 200 and len(from_tensor.json()["predictions"]) == 2
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((1, 3, 64, 64), dtype=np.float32))
    refused = client.post("/invocations", content=wrong.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_tensor"


def test_json_lines_are_answered_line_by_line_in_order(client: TestClient) -> None:
    import json

    colours = ["red", "blue", "green", "red"]
    body = "".join(json.dumps({"b64": b64png(c)}) + "\n" for c in colours)
    response = client.post("/invocations", content=body, headers={"Content-Type": "application/jsonlines"})
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 4
    assert lines[0] == lines[3]  # same input, same answer, same place
    singles = [client.post("/invocations", content=png(colour=c), headers={"Content-Type": "image/png"}).json()
               for c in colours]
    assert [line["predictions"][0]["label"] for line in lines] == [s["predictions"][0]["label"] for s in singles]


def test_custom_attributes_choose_top_k_and_raw_logits(client: TestClient) -> None:
    headers = {"Content-Type": "image/png", "X-Amzn-SageMaker-Custom-Attributes": "top_k=1,raw=true"}
    body = client.post("/invocations", content=png(), headers=headers).json()
    assert len(body["predictions"]) == 1 and len(body["logits"]) == 3
    bad = client.post("/invocations", content=png(), headers={**headers, "X-Amzn-SageMaker-Custom-Attributes": "top_k=-1"})
    assert bad.status_code == 400 and "top_k" in bad.json()["error"]["message"]


def test_request_id_server_timing_metrics_and_openapi(client: TestClient) -> None:
    response = client.post("/invocations", content=png(), headers={"Content-Type": "image/png", "X-Request-Id": "abc"})
    assert response.headers["x-request-id"] == "abc"
    timing = response.headers["server-timing"]
    assert "decode;dur=" in timing and "queue;dur=" in timing and "inference;dur=" in timing
    generated = client.get("/ping").headers["x-request-id"]
    assert len(generated) == 32
    client.post("/invocations", content=b"junk", headers={"Content-Type": "image/png"})
    metrics = client.get("/metrics").text
    assert 'classifier_requests_total{path="/invocations",status="200"}' in metrics
    assert 'classifier_requests_total{path="/invocations",status="400"}' in metrics
    assert "classifier_batch_size_bucket" in metrics
    spec = client.get("/openapi.json").json()
    assert "application/x-image" in spec["paths"]["/invocations"]["post"]["requestBody"]["content"]


def test_execution_parameters(client: TestClient) -> None:
    assert client.get("/execution-parameters").json() == {
        "MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}


def test_a_request_that_cannot_finish_in_its_budget_gets_504_and_ping_tells_of_the_stuck_pass(
        settings: Settings) -> None:
    from dataclasses import replace

    released = threading.Event()

    class Slow(Predictor):
        def infer(self, batch, threads=None):  # type: ignore[no-untyped-def]
            released.wait(timeout=30)
            return super().infer(batch, threads)

    def loader() -> Predictor:
        good = Predictor.load(settings.model_dir, allow_default=False, device="cpu", jit=False)
        slow = Slow(good.model, good.manifest, good.device)
        # No warm-up pass, nor passes timed for the batch bound: only the request's pass is slow.
        slow.warm_up = lambda threads=None: None  # type: ignore[method-assign]
        slow.time_pass = lambda threads, batch=1, runs=2: 1.0  # type: ignore[method-assign]
        return slow

    with client_for(replace(settings, request_timeout_s=0.2), loader) as client:
        wait_for_ping(client, 200)
        response = client.post("/invocations", content=png(), headers={"Content-Type": "image/png"})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        stuck = wait_for_ping(client, 503)  # the pass has now run longer than the request timeout
        assert stuck["status"] == "stuck" and "longer than the 0.2 s request timeout" in stuck["reason"]
        released.set()
        assert wait_for_ping(client, 200) == {"status": "ready"}


def test_s3_references_only_from_allowed_buckets(settings: Settings) -> None:
    import json
    from dataclasses import replace

    import boto3
    from moto import mock_aws

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        for bucket in ("allowed-images", "private-stuff"):
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="cat.png", Body=png())
        loader = lambda: Predictor.load(settings.model_dir, allow_default=False, device="cpu")  # noqa: E731
        with client_for(replace(settings, s3_buckets=frozenset({"allowed-images"})), loader) as client:
            wait_for_ping(client, 200)

            def post(uri: str):
                body = json.dumps({"instances": [{"s3_uri": uri}]})
                return client.post("/invocations", content=body, headers={"Content-Type": "application/json"})

            assert post("s3://allowed-images/cat.png").status_code == 200
            denied = post("s3://private-stuff/cat.png")
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
            assert post("s3://allowed-images/missing.png").status_code == 400
            assert post("https://allowed-images.s3.amazonaws.com/cat.png").status_code == 400


@pytest.mark.parametrize(("inference_threads", "threads_per_worker", "body_bytes", "side", "decoded_on"), [
    (2, 1, 0, 40, "inference"),  # passes side by side: a small image is decoded by its pass
    (2, 1, 300_000, 40, "decode"),  # a large one beforehand, so it never holds up a batch
    (2, 1, 0, 2000, "decode"),  # so is a small body of many pixels (4 megapixels in a few kilobytes)
    (1, 2, 0, 40, "decode"),  # one pass with both cores: decoding in it would idle the other core
    (1, 1, 0, 40, "inference"),  # one core
])
def test_where_an_image_is_decoded(settings: Settings, monkeypatch: pytest.MonkeyPatch, inference_threads: int,
                                   threads_per_worker: int, body_bytes: int, side: int, decoded_on: str) -> None:
    from serve import codec

    threads: list[str] = []
    original = codec._to_rgb

    def to_rgb(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(codec, "_to_rgb", to_rgb)
    settings = Settings(model_dir=settings.model_dir, default_model=False, max_body_bytes=1_000_000,
                        inference_threads=inference_threads, threads_per_worker=threads_per_worker)
    body = png((side, side))
    assert len(body) < 100_000
    body += b"\0" * (body_bytes - len(body))  # bytes after the image's end: still a valid PNG
    loader = lambda: Predictor.load(settings.model_dir, allow_default=False, device="cpu")
    with client_for(settings, loader) as client:
        wait_for_ping(client, 200)
        response = client.post("/invocations", content=body, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert len(threads) == 1 and threads[0].startswith(decoded_on)


def test_a_request_decoding_to_too_many_pixels_gets_413_before_decoding(client: TestClient) -> None:
    """A few kilobytes of one-bit PNG per instance, 40 megapixels each once decoded."""
    import base64
    import json

    bitmap = base64.b64encode(encode(Image.new("1", (6000, 6000)), "PNG")).decode()
    body = json.dumps({"instances": [{"b64": bitmap}] * 8}).encode()
    assert len(body) < 50_000
    response = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "images_too_large"
    assert client.get("/ping").status_code == 200


def test_a_path_cannot_forge_access_log_lines(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="serve.access"):
        client.get("/nothing%0AGET%20/invocations%20200%201.0%20ms")
    [record] = [r for r in caplog.records if "nothing" in r.getMessage()]
    assert "\n" not in record.getMessage() and "/nothing\\nGET /invocations" in record.getMessage()


def test_a_malformed_top_k_is_a_400(client: TestClient) -> None:
    response = client.post("/invocations", content=png(), headers={
        "Content-Type": "image/png", "X-Amzn-SageMaker-Custom-Attributes": b"top_k=\xb2"})
    assert response.status_code == 400 and "top_k" in response.json()["error"]["message"]


def test_a_load_failure_that_may_pass_is_tried_again(settings: Settings, caplog) -> None:
    attempts: list[int] = []

    def flaky() -> Predictor:
        attempts.append(1)
        if len(attempts) == 1:
            raise MemoryError("the host was short of memory for a moment")
        return Predictor.load(settings.model_dir, allow_default=False, device="cpu", jit=False)

    assert isinstance(load_with_retries(flaky, lambda predictor: None, retry_delays_s=(0.0, 0.0)), Predictor)
    assert len(attempts) == 2
    assert "trying again in 0 s" in caplog.text


def test_a_load_failure_no_retry_mends_fails_at_once_and_ping_shows_no_server_paths(tmp_path: Path) -> None:
    attempts: list[int] = []

    def missing() -> Predictor:
        attempts.append(1)
        return Predictor.load(tmp_path / "nowhere", allow_default=False, device="cpu")

    with pytest.raises(Exception) as failure:
        load_with_retries(missing, lambda predictor: None, retry_delays_s=(0.0, 0.0))
    assert len(attempts) == 1
    reason = public_reason(failure.value)
    assert str(tmp_path) not in reason and "nowhere" in reason


@pytest.mark.parametrize(("text", "shown"), [
    ("no manifest.json in /opt/ml/model: not a model artifact", "no manifest.json in model: not a model artifact"),
    ("'/opt/ml/model/code/inference.py' failed", "'inference.py' failed"),
    ("expects application/json and s3://bucket/key, 1/2 of it", "expects application/json and s3://bucket/key, 1/2 of it"),
])
def test_public_reasons_keep_only_the_last_part_of_absolute_paths(text: str, shown: str) -> None:
    assert public_reason(RuntimeError(text)) == f"RuntimeError: {shown}"


def noisy_png(side: int, seed: int = 0) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def test_an_image_above_the_in_memory_limit_is_streamed_to_disk_and_answered_the_same(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spooled: list[int] = []
    closed: list[bool] = []
    finish, release = SpooledBody.finish, SpooledBody.release

    def counted(self: SpooledBody, chunks: list[bytes]) -> None:
        finish(self, chunks)
        spooled.append(self.size)

    def released(self: SpooledBody) -> None:
        release(self)
        closed.append(self.file.closed)

    monkeypatch.setattr(SpooledBody, "finish", counted)
    monkeypatch.setattr(SpooledBody, "release", released)
    body = noisy_png(700)
    assert len(body) > 1_000_000
    loader = lambda: Predictor.load(settings.model_dir, allow_default=False, device="cpu")
    answers = []
    for spool_above in (2_000_000, 300_000):  # in memory, then through a file
        large = Settings(model_dir=settings.model_dir, default_model=False, max_body_bytes=4_000_000,
                         spool_body_bytes=spool_above, spool_dir=tmp_path)
        with client_for(large, loader) as client:
            wait_for_ping(client, 200)
            response = client.post("/invocations", content=body, headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text
            answers.append(response.json())
    assert spooled == [len(body)]  # the second time only
    assert closed == [True]  # closed by the thread that decoded it, before the request ended
    assert answers[0] == answers[1]


def test_an_image_streamed_to_disk_must_be_one_that_decodes_as_it_is_read(settings: Settings, tmp_path: Path) -> None:
    """WebP's decoder reads the whole file into memory first: above the spool limit it is refused."""
    encoded = io.BytesIO()
    Image.new("RGB", (400, 400), "red").save(encoded, "WEBP", lossless=True)
    body = encoded.getvalue() + b"\0" * 400_000  # bytes after the image's end
    large = Settings(model_dir=settings.model_dir, default_model=False, max_body_bytes=4_000_000,
                     spool_body_bytes=300_000, spool_dir=tmp_path)
    with client_for(large, lambda: Predictor.load(large.model_dir, allow_default=False, device="cpu")) as client:
        wait_for_ping(client, 200)
        response = client.post("/invocations", content=body, headers={"Content-Type": "image/webp"})
        assert response.status_code == 413, response.text
        assert "must be JPEG, PNG, GIF, BMP or TIFF" in response.json()["error"]["message"]
        small = client.post("/invocations", content=encoded.getvalue(), headers={"Content-Type": "image/webp"})
        assert small.status_code == 200, small.text


def test_only_one_image_may_be_larger_than_the_in_memory_limit(settings: Settings) -> None:
    import base64
    import json

    document = json.dumps({"instances": [{"b64": base64.b64encode(noisy_png(400)).decode()}]}).encode()
    assert 300_000 < len(document) < 4_000_000
    for memory_limit, status in ((300_000, 413), (None, 200)):  # None: the body limit (Batch Transform's way)
        large = Settings(model_dir=settings.model_dir, default_model=False, max_body_bytes=4_000_000,
                         spool_body_bytes=300_000, max_memory_body_bytes=memory_limit)
        with client_for(large, lambda: Predictor.load(settings.model_dir, allow_default=False, device="cpu")) as client:
            wait_for_ping(client, 200)
            response = client.post("/invocations", content=document, headers={"Content-Type": "application/json"})
            assert response.status_code == status, response.text
            if status == 413:
                error = response.json()["error"]
                assert error["code"] == "payload_too_large"
                assert "limit is 300000 bytes for this content type; only one image may be larger, up to 4000000" in (
                    error["message"])
            assert client.get("/ping").status_code == 200
