"""The Lambda function in deploy/lambda/handler.py.

Requests are checked against botocore's sagemaker-runtime API model with a Stubber, S3 references
run against moto's in-process S3, and the container test sends the function's real InvokeEndpoint
call, through a small local stand-in for SageMaker's front end, to the real serving image.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import boto3
import httpx
import pytest
from botocore.exceptions import ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import Stubber
from PIL import Image

import containers
import imagedata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "lambda"))

import handler  # deploy/lambda is not a package: "lambda" is a keyword

ENDPOINT = "image-classifier-prod"
ENV = {"ENDPOINT_NAME": ENDPOINT}
CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


@pytest.fixture(autouse=True)
def dummy_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials only, and no profile or config file of the machine running the tests."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def png(size: tuple[int, int] = (8, 8)) -> bytes:
    return imagedata.encode(Image.new("RGB", size, (200, 30, 30)), "PNG")


def noisy_png(seed: int = 0) -> bytes:
    """A PNG of a few kilobytes: noise does not compress."""
    return imagedata.encode(Image.frombytes("RGB", (32, 32), random.Random(seed).randbytes(32 * 32 * 3)), "PNG")


def jpeg() -> bytes:
    return imagedata.encode(Image.new("RGB", (8, 8), (30, 200, 30)), "JPEG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def predictions(count: int) -> list[dict[str, Any]]:
    return [{"label": f"class{i}", "index": i, "probability": round(0.5 / (i + 1), 6)} for i in range(count)]


def endpoint_answer(body: dict[str, Any]) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    return {"Body": StreamingBody(io.BytesIO(raw), len(raw)), "ContentType": "application/json"}


def rest_event(body: str | None, *, base64_encoded: bool = True, content_type: str = "image/jpeg",
               method: str = "POST", origin: str | None = None) -> dict[str, Any]:
    """An API Gateway REST API (payload 1.0) proxy event."""
    headers = {"Content-Type": content_type}
    if origin:
        headers["Origin"] = origin
    return {"resource": "/classify", "path": "/classify", "httpMethod": method, "headers": headers,
            "requestContext": {"stage": "prod", "requestId": "r-1"}, "body": body,
            "isBase64Encoded": base64_encoded}


def http_api_event(body: str, *, base64_encoded: bool = False, content_type: str = "application/json",
                   method: str = "POST", origin: str | None = None) -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) proxy event: lower-case headers, method in requestContext."""
    headers = {"content-type": content_type}
    if origin:
        headers["origin"] = origin
    return {"version": "2.0", "routeKey": "POST /classify", "rawPath": "/classify", "headers": headers,
            "requestContext": {"http": {"method": method, "path": "/classify"}}, "body": body,
            "isBase64Encoded": base64_encoded}


class Harness:
    """The function's core with a stubbed sagemaker-runtime client (and whatever S3 client a test adds)."""

    def __init__(self, env: dict[str, str] | None = None, s3: Any = None) -> None:
        self.settings = handler.from_env({**ENV, **(env or {})})
        self.runtime = boto3.client("sagemaker-runtime", region_name="us-east-1")
        self.stub = Stubber(self.runtime)
        self.stub.activate()
        self.s3 = s3
        self.built: list[str] = []

        def factory(service: str, config: Any) -> Any:
            self.built.append(service)
            return {"sagemaker-runtime": self.runtime, "s3": self.s3}[service]

        self.clients = handler.Clients(self.settings, factory=factory)

    def expect(self, image: bytes, content_type: str, answer: dict[str, Any] | None = None) -> None:
        self.stub.add_response(
            "invoke_endpoint",
            endpoint_answer(answer or {"predictions": predictions(5)}),
            expected_params={"EndpointName": ENDPOINT, "ContentType": content_type, "Accept": "application/json",
                             "Body": image},
        )

    def __call__(self, event: Any) -> tuple[int, dict[str, str], Any]:
        response = handler.handle(event, self.settings, self.clients)
        self.stub.assert_no_pending_responses()
        assert set(response) == {"statusCode", "headers", "body", "isBase64Encoded"}
        assert response["isBase64Encoded"] is False
        body = json.loads(response["body"]) if response["body"] else None
        return response["statusCode"], response["headers"], body


@pytest.fixture
def call() -> Harness:
    return Harness()


def assert_error(status: int, headers: dict[str, str], body: Any, expected_status: int, code: str) -> str:
    assert (status, body["error"]["code"]) == (expected_status, code), body
    assert headers["Content-Type"] == "application/json"
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    assert "Traceback" not in json.dumps(body)
    return body["error"]["message"]


# --- successful requests ----------------------------------------------------------------------


def test_rest_api_binary_body_is_sent_to_the_endpoint(call: Harness) -> None:
    image = jpeg()
    call.expect(image, "image/jpeg", {"predictions": predictions(7)})

    status, headers, body = call(rest_event(b64(image)))

    assert status == 200
    assert headers == {"Content-Type": "application/json"}
    assert body == {"predictions": predictions(5)}  # TOP_K=5 of the endpoint's 7


def test_http_api_json_image(call: Harness) -> None:
    image = png()
    call.expect(image, "image/png")

    status, _, body = call(http_api_event(json.dumps({"image": b64(image)})))

    assert status == 200
    assert [p["label"] for p in body["predictions"]] == [f"class{i}" for i in range(5)]


def test_base64_json_body_and_data_url(call: Harness) -> None:
    """A REST API with binary media type */* base64-encodes JSON bodies too."""
    image = png()
    call.expect(image, "image/png")
    payload = json.dumps({"image": f"data:image/png;base64,{b64(image)}"}).encode()

    status, _, _ = call(rest_event(b64(payload), content_type="application/json"))

    assert status == 200


def test_direct_invocation(call: Harness) -> None:
    image = jpeg()
    call.expect(image, "image/jpeg", {"predictions": predictions(2)})

    status, _, body = call({"image": b64(image)})

    assert (status, body) == (200, {"predictions": predictions(2)})


@pytest.mark.parametrize(
    ("image_format", "media_type"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif"),
     ("BMP", "image/bmp"), ("TIFF", "image/tiff")],
)
def test_content_type_comes_from_the_bytes_not_the_client(call: Harness, image_format: str, media_type: str) -> None:
    image = imagedata.encode(Image.new("RGB", (8, 8), (1, 2, 3)), image_format)
    call.expect(image, media_type)

    status, _, _ = call(rest_event(b64(image), content_type="application/x-image"))

    assert status == 200


def test_top_k_and_prediction_fields() -> None:
    call = Harness({"TOP_K": "2"})
    image = png()
    noisy = [{**p, "logit": 3.2, "debug": "x"} for p in predictions(4)]
    call.expect(image, "image/png", {"predictions": noisy, "timing_ms": 12})

    status, _, body = call({"image": b64(image)})

    assert (status, body) == (200, {"predictions": predictions(2)})


# --- bad requests: 400 and no call to the endpoint --------------------------------------------

TOO_BIG = {"MAX_IMAGE_BYTES": "100"}


@pytest.mark.parametrize(
    ("event", "env", "code"),
    [
        pytest.param("just a string", {}, "invalid_request", id="event-not-an-object"),
        pytest.param(rest_event(None), {}, "invalid_request", id="no-body"),
        pytest.param(rest_event(""), {}, "invalid_request", id="empty-body"),
        pytest.param(rest_event("@@not base64@@"), {}, "invalid_base64", id="bad-base64-body"),
        pytest.param({"image": ""}, {}, "invalid_image", id="empty-json-image"),
        pytest.param({"image": "a*b="}, {}, "invalid_base64", id="bad-base64-json-image"),
        pytest.param({"image": 12}, {}, "invalid_request", id="image-not-a-string"),
        pytest.param(rest_event(b64(b"hello, I am not an image")), {}, "unsupported_media_type", id="not-an-image"),
        pytest.param({"image": b64(b"%PDF-1.7 not an image")}, {}, "unsupported_media_type", id="pdf"),
        pytest.param(rest_event(b64(noisy_png())), TOO_BIG, "payload_too_large", id="too-big-body"),
        pytest.param({"image": b64(noisy_png())}, TOO_BIG, "payload_too_large", id="too-big-json"),
        pytest.param(http_api_event("{not json"), {}, "invalid_json", id="bad-json"),
        pytest.param(http_api_event("[1, 2]"), {}, "invalid_request", id="json-array"),
        pytest.param(http_api_event("{}"), {}, "invalid_request", id="json-without-image"),
        pytest.param(http_api_event("plain text", content_type="text/plain"), {}, "invalid_request",
                     id="text-body"),
        pytest.param({"image": b64(png()), "s3_uri": "s3://images/a.png"}, {"ALLOWED_BUCKETS": "images"},
                     "invalid_request", id="image-and-s3"),
        pytest.param({"s3": {"bucket": "other", "key": "a.png"}}, {"ALLOWED_BUCKETS": "images"},
                     "s3_not_allowed", id="bucket-not-allowed"),
        pytest.param({"s3_uri": "s3://images/a.png"}, {}, "s3_not_allowed", id="s3-disabled"),
        pytest.param({"s3_uri": "https://images/a.png"}, {"ALLOWED_BUCKETS": "images"}, "invalid_request",
                     id="bad-s3-uri"),
        pytest.param({"s3": {"bucket": "images"}}, {"ALLOWED_BUCKETS": "images"}, "invalid_request",
                     id="s3-without-key"),
    ],
)
def test_bad_requests_are_400_without_calling_the_endpoint(event: Any, env: dict[str, str], code: str) -> None:
    call = Harness(env)

    status, headers, body = call(event)

    assert_error(status, headers, body, 400, code)
    assert call.built == []  # no AWS client was even created


def test_too_big_base64_is_refused_before_decoding() -> None:
    call = Harness(TOO_BIG)
    status, headers, body = call({"image": "A" * 1000 + "!"})  # invalid, but its length alone is too much

    message = assert_error(status, headers, body, 400, "payload_too_large")
    assert "100 bytes" in message


def test_other_methods_are_405(call: Harness) -> None:
    status, headers, body = call(rest_event(None, method="GET"))

    assert_error(status, headers, body, 405, "method_not_allowed")


# --- endpoint errors --------------------------------------------------------------------------


def test_model_error_is_502_with_the_containers_message(call: Harness) -> None:
    container_body = json.dumps({"error": {"code": "invalid_image", "message": "the image could not be decoded"}})
    call.stub.add_client_error(
        "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
        service_message="Received client error (400) from primary with message \"...\"",
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": container_body,
                        "LogStreamArn": "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/x"},
    )

    status, headers, body = call({"image": b64(png())})

    message = assert_error(status, headers, body, 502, "model_error")
    assert message == "the model endpoint rejected the image: the image could not be decoded"
    assert "123456789012" not in json.dumps(body)


def test_model_server_error_is_502(call: Harness) -> None:
    call.stub.add_client_error(
        "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
        service_message="Received server error (500) from primary",
        modeled_fields={"OriginalStatusCode": 500, "OriginalMessage": "Internal Server Error"},
    )

    status, headers, body = call({"image": b64(png())})

    message = assert_error(status, headers, body, 502, "model_error")
    assert message == "the model endpoint failed: Internal Server Error"


def test_unknown_endpoint_is_502_without_account_details(call: Harness) -> None:
    call.stub.add_client_error(
        "invoke_endpoint", service_error_code="ValidationError", http_status_code=400,
        service_message=f"Endpoint {ENDPOINT} of account 123456789012 not found.",
    )

    status, headers, body = call({"image": b64(png())})

    message = assert_error(status, headers, body, 502, "endpoint_not_found")
    assert "endpoint was not found" in message
    assert "123456789012" not in json.dumps(body)


def test_throttling_is_502(call: Harness) -> None:
    call.stub.add_client_error("invoke_endpoint", service_error_code="ModelNotReadyException", http_status_code=429,
                               service_message="Model not ready")

    status, headers, body = call({"image": b64(png())})

    assert_error(status, headers, body, 502, "endpoint_unavailable")


def test_unexpected_endpoint_answer_is_502(call: Harness) -> None:
    image = png()
    call.expect(image, "image/png", {"labels": ["cat"]})

    status, headers, body = call({"image": b64(image)})

    assert_error(status, headers, body, 502, "invalid_model_response")


def test_timeout_is_504() -> None:
    class TimingOut:
        calls = 0

        def invoke_endpoint(self, **params: Any) -> Any:
            TimingOut.calls += 1
            raise ReadTimeoutError(endpoint_url="https://runtime.sagemaker.us-east-1.amazonaws.com/")

    settings = handler.from_env(ENV)
    response = handler.handle({"image": b64(png())}, settings, handler.Clients(settings, lambda *_: TimingOut()))

    assert response["statusCode"] == 504
    assert json.loads(response["body"])["error"]["code"] == "endpoint_timeout"
    assert "amazonaws" not in response["body"]
    assert TimingOut.calls == 1


# --- CORS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "origin", "expected"),
    [
        (None, "https://app.example.com", {}),
        ("*", "https://app.example.com", {"Access-Control-Allow-Origin": "*"}),
        ("https://a.example.com, https://app.example.com", "https://app.example.com",
         {"Access-Control-Allow-Origin": "https://app.example.com", "Vary": "Origin"}),
        ("https://a.example.com", "https://evil.example.com", {"Vary": "Origin"}),
    ],
)
def test_cors_headers(allowed: str | None, origin: str, expected: dict[str, str]) -> None:
    call = Harness({"ALLOWED_ORIGINS": allowed} if allowed else {})
    image = png()
    call.expect(image, "image/png")

    ok = call(rest_event(b64(image), origin=origin))
    error = call(rest_event(b64(b"nope"), origin=origin))

    assert ok[0] == 200 and ok[1] == {"Content-Type": "application/json", **expected}
    assert error[0] == 400 and error[1] == {"Content-Type": "application/json", **expected}


def test_preflight_is_204_with_cors_headers() -> None:
    call = Harness({"ALLOWED_ORIGINS": "https://app.example.com"})

    status, headers, body = call(http_api_event("", method="OPTIONS", origin="https://app.example.com"))

    assert (status, body) == (204, None)
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert "Content-Type" in headers["Access-Control-Allow-Headers"]
    assert call.built == []


# --- S3 references (moto) ---------------------------------------------------------------------


@pytest.fixture
def s3() -> Iterator[Any]:
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="images")
        client.create_bucket(Bucket="private")
        yield client


@pytest.mark.parametrize("style", ["s3", "s3_uri"])
def test_s3_reference(s3: Any, style: str) -> None:
    image = jpeg()
    s3.put_object(Bucket="images", Key="uploads/cat 1.jpg", Body=image)
    call = Harness({"ALLOWED_BUCKETS": "other, images"}, s3=s3)
    call.expect(image, "image/jpeg")
    payload = ({"s3": {"bucket": "images", "key": "uploads/cat 1.jpg"}} if style == "s3"
               else {"s3_uri": "s3://images/uploads/cat 1.jpg"})

    status, _, body = call(http_api_event(json.dumps(payload)))

    assert status == 200 and len(body["predictions"]) == 5
    assert call.built == ["s3", "sagemaker-runtime"]


def test_s3_reference_to_a_missing_object_is_400(s3: Any) -> None:
    call = Harness({"ALLOWED_BUCKETS": "images"}, s3=s3)

    status, headers, body = call({"s3_uri": "s3://images/missing.png"})

    message = assert_error(status, headers, body, 400, "s3_object_unavailable")
    assert "s3://images/missing.png" in message


def test_s3_reference_too_big_or_not_an_image_is_400(s3: Any) -> None:
    s3.put_object(Bucket="images", Key="big.png", Body=noisy_png())
    s3.put_object(Bucket="images", Key="notes.txt", Body=b"not an image")
    call = Harness({"ALLOWED_BUCKETS": "images", **TOO_BIG}, s3=s3)

    assert_error(*call({"s3_uri": "s3://images/big.png"}), 400, "payload_too_large")
    assert_error(*call({"s3_uri": "s3://images/notes.txt"}), 400, "unsupported_media_type")
    assert_error(*call({"s3_uri": "s3://private/notes.txt"}), 400, "s3_not_allowed")


# --- settings, clients and the entry point ----------------------------------------------------


def test_settings_defaults_and_parsing() -> None:
    assert handler.from_env(ENV) == handler.Settings(
        endpoint_name=ENDPOINT, allowed_origins=(), max_image_bytes=6 * 1024 * 1024, allowed_buckets=frozenset(),
        top_k=5, connect_timeout_s=1.0, read_timeout_s=8.0, max_attempts=3, log_level="INFO",
    )
    settings = handler.from_env({**ENV, "ALLOWED_ORIGINS": " https://a.com ,https://b.com,", "TOP_K": "3",
                                 "ALLOWED_BUCKETS": "x,y", "MAX_IMAGE_BYTES": "1000", "READ_TIMEOUT_S": "5.5"})
    assert settings.allowed_origins == ("https://a.com", "https://b.com")
    assert settings.allowed_buckets == {"x", "y"}
    assert (settings.top_k, settings.max_image_bytes, settings.read_timeout_s) == (3, 1000, 5.5)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "ENDPOINT_NAME"),
        ({"ENDPOINT_NAME": "bad_name!"}, "ENDPOINT_NAME='bad_name!'"),
        ({**ENV, "MAX_IMAGE_BYTES": "lots"}, "MAX_IMAGE_BYTES='lots'"),
        ({**ENV, "MAX_IMAGE_BYTES": "7000000"}, "MAX_IMAGE_BYTES='7000000'"),  # over InvokeEndpoint's limit
        ({**ENV, "TOP_K": "0"}, "TOP_K='0'"),
        ({**ENV, "READ_TIMEOUT_S": "-1"}, "READ_TIMEOUT_S='-1'"),
        ({**ENV, "LOG_LEVEL": "chatty"}, "LOG_LEVEL='CHATTY'"),
    ],
)
def test_settings_errors_name_the_key_and_value(env: dict[str, str], named: str) -> None:
    with pytest.raises(handler.ConfigError, match=re.escape(named)):
        handler.from_env(env)


def test_clients_are_built_once_with_retries_and_timeouts() -> None:
    settings = handler.from_env({**ENV, "CONNECT_TIMEOUT_S": "1.5", "READ_TIMEOUT_S": "12"})
    built: list[tuple[str, Any]] = []
    clients = handler.Clients(settings, lambda service, config: built.append((service, config)) or object())

    first = clients.get("sagemaker-runtime")
    assert clients.get("sagemaker-runtime") is first
    assert len(built) == 1
    service, config = built[0]
    assert service == "sagemaker-runtime"
    assert config.retries == {"total_max_attempts": 3, "mode": "standard"}  # 3 tries in all
    assert (config.connect_timeout, config.read_timeout) == (1.5, 12.0)


def test_default_client_is_a_real_sagemaker_runtime_client() -> None:
    settings = handler.from_env(ENV)
    client = handler.Clients(settings).get("sagemaker-runtime")

    assert client.meta.service_model.service_name == "sagemaker-runtime"
    assert (client.meta.config.connect_timeout, client.meta.config.read_timeout) == (1.0, 8.0)
    assert client.meta.config.retries == {"total_max_attempts": 3, "mode": "standard"}


def test_entry_point_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                call: Harness) -> None:
    monkeypatch.setattr(handler, "_STATE", None)
    monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
    monkeypatch.setenv("ALLOWED_ORIGINS", "*")
    monkeypatch.setattr(handler, "make_client", lambda service, config: call.runtime)
    image = png()
    call.expect(image, "image/png")
    call.expect(image, "image/png")

    with caplog.at_level(logging.INFO, logger="handler"):
        first = handler.handler({"image": b64(image)}, None)
        monkeypatch.setenv("ALLOWED_ORIGINS", "https://changed.example.com")
        second = handler.handler({"image": b64(image)}, None)

    call.stub.assert_no_pending_responses()
    assert first["statusCode"] == second["statusCode"] == 200
    assert second["headers"]["Access-Control-Allow-Origin"] == "*"  # settings were read on the first call
    outcomes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert len(outcomes) == 2 and all("200 ok" in line and "image/png" in line for line in outcomes)


def test_entry_point_without_endpoint_name_is_500_misconfigured(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(handler, "_STATE", None)
    monkeypatch.delenv("ENDPOINT_NAME", raising=False)

    with caplog.at_level(logging.ERROR, logger="handler"):
        response = handler.handler({"image": b64(png())}, None)

    assert response["statusCode"] == 500
    assert json.loads(response["body"])["error"]["code"] == "misconfigured"
    assert "ENDPOINT_NAME" not in response["body"]
    assert "ENDPOINT_NAME" in caplog.text


# --- the real serving container behind a stand-in for SageMaker's front end -------------------


class InvokeEndpointAdapter(BaseHTTPRequestHandler):
    """Answers InvokeEndpoint's REST call the way SageMaker does, with the container behind it."""

    container_url = ""
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        match = re.fullmatch(r"/endpoints/([^/]+)/invocations", self.path)
        self.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if match is None:
            return self.answer(404, {"message": f"no route {self.path}"}, "UnknownOperationException")
        answer = httpx.post(
            f"{self.container_url}/invocations", content=body, timeout=60,
            headers={k: self.headers[k] for k in ("Content-Type", "Accept") if self.headers[k]},
        )
        if answer.status_code == 200:
            return self.answer(200, answer.content, content_type=answer.headers["content-type"])
        kind = "client" if answer.status_code < 500 else "server"
        return self.answer(424, {
            "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
            "OriginalStatusCode": answer.status_code,
            "OriginalMessage": answer.text,
            "Message": f"Received {kind} error ({answer.status_code}) from primary with message \"{answer.text}\".",
        }, "ModelError")

    def answer(self, status: int, body: Any, error_type: str | None = None, content_type: str = "application/json"
               ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        logging.getLogger(__name__).debug(format, *args)


@pytest.fixture(scope="module")
def served() -> Iterator[containers.Served]:
    with containers.serving(containers.image_for("cpu")) as served:
        yield served


@pytest.fixture
def real_endpoint(served: containers.Served) -> Iterator[tuple[handler.Settings, handler.Clients, list]]:
    adapter = type("Adapter", (InvokeEndpointAdapter,), {"container_url": served.url, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), adapter)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        settings = handler.from_env({**ENV, "READ_TIMEOUT_S": "60"})
        url = f"http://127.0.0.1:{server.server_address[1]}"

        def factory(service: str, config: Any) -> Any:
            assert service == "sagemaker-runtime"
            return boto3.client(service, region_name="us-east-1", endpoint_url=url, config=config)

        yield settings, handler.Clients(settings, factory), adapter.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.container
def test_real_container_classifies_a_cat(real_endpoint: tuple) -> None:
    settings, clients, requests = real_endpoint
    event = rest_event(b64(imagedata.cat_photo_jpeg()), content_type="image/jpeg")

    response = handler.handle(event, settings, clients)

    assert response["statusCode"] == 200, response["body"]
    predictions = json.loads(response["body"])["predictions"]
    assert len(predictions) == 5
    assert predictions[0]["label"] in CAT_LABELS, predictions
    assert all(set(p) == {"label", "index", "probability"} for p in predictions)
    assert [r["path"] for r in requests] == [f"/endpoints/{ENDPOINT}/invocations"]
    sent = requests[0]["headers"]
    assert (sent["Content-Type"], sent["Accept"]) == ("image/jpeg", "application/json")
    assert sent["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=testing/")


@pytest.mark.container
def test_real_container_rejection_is_502_with_its_message(real_endpoint: tuple, served: containers.Served) -> None:
    settings, clients, requests = real_endpoint
    corrupt = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    direct = httpx.post(f"{served.url}/invocations", content=corrupt, headers={"Content-Type": "image/png"},
                        timeout=60)
    assert direct.status_code == 400
    container_message = direct.json()["error"]["message"]

    response = handler.handle({"image": b64(corrupt)}, settings, clients)

    assert response["statusCode"] == 502
    error = json.loads(response["body"])["error"]
    assert error == {"code": "model_error",
                     "message": f"the model endpoint rejected the image: {container_message}"}
    assert len(requests) == 1  # a model error is not retried
