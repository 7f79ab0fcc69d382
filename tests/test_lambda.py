"""The Lambda function in deploy/lambda/handler.py.

Requests are checked against botocore's sagemaker-runtime API model with a Stubber, S3 references
run against moto's in-process S3, timeouts and retries against scripted HTTP stand-ins for
SageMaker's runtime and S3 on 127.0.0.1, and the container test sends the function's real
InvokeEndpoint call, through a small local stand-in for SageMaker's front end, to the real serving
image.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
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

        self.clients = handler.Clients(factory)

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
    response = handler.handle({"image": b64(png())}, settings, handler.Clients(lambda *_: TimingOut()))

    assert response["statusCode"] == 504
    assert json.loads(response["body"])["error"]["code"] == "endpoint_timeout"
    assert "amazonaws" not in response["body"]
    assert TimingOut.calls == 1


# --- the time budget and retries, against stand-ins on 127.0.0.1 ------------------------------

HOLD_LIMIT_S = 20  # a stand-in holds a request at most this long, even if a test forgets to end it
THROTTLED = {"x-amzn-ErrorType": "ThrottlingException", "Content-Type": "application/json"}


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    after_s: float = 0.0  # math.inf: hold the request until the test ends, never answering


def invoke_ok() -> Reply:
    return Reply(200, json.dumps({"predictions": predictions(5)}).encode(), {"Content-Type": "application/json"})


def throttled() -> Reply:
    return Reply(400, json.dumps({"message": "Rate exceeded"}).encode(), THROTTLED)


class ScriptedService:
    """An HTTP stand-in for one AWS service: the n-th request gets the n-th reply (the last one repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = replies
        self.requests: list[str] = []
        self.ended = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service.answer(self)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        request.rfile.read(int(request.headers.get("Content-Length") or 0))
        self.requests.append(f"{request.command} {request.path}")
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if self.ended.wait(timeout=min(reply.after_s, HOLD_LIMIT_S)):
            return  # the test is over: hang up without answering
        request.send_response(reply.status)
        for name, value in {"Content-Length": str(len(reply.body)), **reply.headers}.items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(reply.body)

    def __enter__(self) -> ScriptedService:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.ended.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class LocalAws:
    """Real boto3 clients, built by the function's own Clients, that send to 127.0.0.1; records every attempt."""

    def __init__(self, runtime_url: str, s3_url: str | None = None) -> None:
        self.urls = {"sagemaker-runtime": runtime_url, **({"s3": s3_url} if s3_url else {})}
        self.sent: list[str] = []  # one entry per HTTP attempt, counted by botocore's own before-send event
        self.built: list[Any] = []
        self.clients = handler.Clients(self.factory)

    def factory(self, service: str, config: Config) -> Any:
        client = boto3.client(service, region_name="us-east-1", endpoint_url=self.urls[service],
                              config=config.merge(Config(s3={"addressing_style": "path"})))
        client.meta.events.register("before-send", lambda request, **_: self.sent.append(f"{service} {request.url}"))
        self.built.append(client)
        return client

    def close(self) -> None:
        for client in self.built:
            client.close()


@pytest.fixture
def local_aws() -> Iterator[Any]:
    made: list[LocalAws] = []

    def make(runtime_url: str, s3_url: str | None = None) -> LocalAws:
        made.append(LocalAws(runtime_url, s3_url))
        return made[-1]

    yield make
    for aws in made:
        aws.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that is bound (so nobody else takes it) but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class LambdaContext:
    """Lambda's context object as far as the function uses it: a timeout that runs out."""

    def __init__(self, remaining_s: float) -> None:
        self.ends = time.monotonic() + remaining_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.ends - time.monotonic()) * 1000))


def timed(event: Any, aws: LocalAws, remaining_s: float, env: dict[str, str] | None = None
          ) -> tuple[int, str, float]:
    """Handle the event with remaining_s left before Lambda's timeout: status, error code, seconds taken."""
    settings = handler.from_env({**ENV, **(env or {})})
    started = time.monotonic()
    response = handler.handle(event, settings, aws.clients, LambdaContext(remaining_s))
    taken = time.monotonic() - started
    body = json.loads(response["body"])
    return response["statusCode"], body.get("error", {}).get("code", ""), taken


@pytest.mark.parametrize(
    ("left_s", "expected"),
    [
        (math.inf, (1.0, 60.0)),  # no limit: the configured timeouts
        (28.5, (1.0, 27.5)),
        (1.5, (0.75, 0.75)),  # connecting gets at most half
        (0.6, (0.25, 0.25)),
        (0.4, None),  # too little for an attempt
        (-1.0, None),
    ],
)
def test_attempt_timeouts_never_outlast_the_time_left(left_s: float, expected: tuple[float, float] | None) -> None:
    timeouts = handler.attempt_timeouts(handler.from_env(ENV), left_s)

    assert timeouts == expected
    assert timeouts is None or sum(timeouts) <= left_s


def test_attempt_timeouts_keep_the_configured_ones_when_time_allows() -> None:
    settings = handler.from_env({**ENV, "CONNECT_TIMEOUT_S": "0.1", "READ_TIMEOUT_S": "5"})

    assert handler.attempt_timeouts(settings, 28.5) == (0.1, 5.0)


def test_deadline_is_the_earliest_limit_less_a_margin() -> None:
    settings = handler.from_env(ENV)

    def left(event: Any, context: Any = None) -> float:
        return handler.deadline_for(event, context, settings).left()

    def stamped(event: dict[str, Any], key: str, epoch_s: float) -> dict[str, Any]:
        return {**event, "requestContext": {**event["requestContext"], key: int(epoch_s * 1000)}}

    margin, now = handler.SAFETY_MARGIN_S, time.time()
    assert left({"image": "x"}) == math.inf
    assert left({"image": "x"}, LambdaContext(10)) == pytest.approx(10 - margin, abs=0.2)
    assert left(rest_event("x")) == pytest.approx(29 - margin, abs=0.2)
    assert left(rest_event("x"), LambdaContext(10)) == pytest.approx(10 - margin, abs=0.2)
    # API Gateway's clock started when it received the request, before a cold start.
    assert left(stamped(rest_event("x"), "requestTimeEpoch", now - 3)) == pytest.approx(26 - margin, abs=0.2)
    assert left(stamped(http_api_event("{}"), "timeEpoch", now - 3)) == pytest.approx(26 - margin, abs=0.2)
    # A stored sample event's stamp is years old: no request waits that long.
    assert left(stamped(rest_event("x"), "requestTimeEpoch", 1428582896)) == pytest.approx(29 - margin, abs=0.2)


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "InvokeEndpoint")


URL = "https://runtime.sagemaker.us-east-1.amazonaws.com/"


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        pytest.param(EndpointConnectionError(endpoint_url=URL), True, id="connection-refused"),
        pytest.param(ConnectTimeoutError(endpoint_url=URL), True, id="connect-timeout"),
        pytest.param(client_error("ThrottlingException", 400), True, id="throttled"),
        pytest.param(client_error("SlowDown", 503), True, id="s3-slow-down"),
        pytest.param(ReadTimeoutError(endpoint_url=URL), False, id="read-timeout"),
        pytest.param(ConnectionClosedError(endpoint_url=URL), False, id="connection-closed"),
        pytest.param(client_error("ModelError", 424), False, id="model-error"),
        pytest.param(client_error("ModelNotReadyException", 429), False, id="model-not-ready"),
        pytest.param(client_error("InternalFailure", 500), False, id="internal-failure"),
        pytest.param(client_error("ServiceUnavailable", 503), False, id="service-unavailable"),
    ],
)
def test_only_requests_that_did_no_work_are_retried(error: Exception, retried: bool) -> None:
    assert handler.is_safe_to_retry(error) is retried


def test_slow_endpoint_is_called_once_and_answered_504_before_lambdas_timeout(local_aws: Any) -> None:
    with ScriptedService(Reply(after_s=math.inf)) as endpoint:
        aws = local_aws(endpoint.url)

        status, code, taken = timed({"image": b64(png())}, aws, remaining_s=2.0)

        assert (status, code) == (504, "endpoint_timeout")
        assert taken < 2.0
        assert len(endpoint.requests) == len(aws.sent) == 1  # one model run, not one per attempt


def test_api_gateway_event_is_answered_before_the_gateways_timeout(local_aws: Any) -> None:
    event = http_api_event(json.dumps({"image": b64(png())}))
    event["requestContext"]["timeEpoch"] = int((time.time() - 0.5) * 1000)  # the gateway has waited 0.5 s
    with ScriptedService(Reply(after_s=math.inf)) as endpoint:
        aws = local_aws(endpoint.url)

        status, code, taken = timed(event, aws, remaining_s=10.0, env={"GATEWAY_TIMEOUT_S": "2"})

        assert (status, code) == (504, "endpoint_timeout")
        assert taken < 1.5  # what the gateway had left
        assert len(endpoint.requests) == 1


@pytest.mark.parametrize("max_attempts", [3, 2])
def test_throttling_is_retried_max_attempts_times(local_aws: Any, max_attempts: int) -> None:
    with ScriptedService(throttled()) as endpoint:
        aws = local_aws(endpoint.url)

        status, code, _ = timed({"image": b64(png())}, aws, remaining_s=10.0,
                                env={"MAX_ATTEMPTS": str(max_attempts)})

        assert (status, code) == (502, "endpoint_unavailable")
        assert len(endpoint.requests) == len(aws.sent) == max_attempts


def test_throttled_then_answered_is_200(local_aws: Any) -> None:
    with ScriptedService(throttled(), throttled(), invoke_ok()) as endpoint:
        aws = local_aws(endpoint.url)

        status, _, _ = timed({"image": b64(png())}, aws, remaining_s=10.0)

        assert status == 200
        assert endpoint.requests == [f"POST /endpoints/{ENDPOINT}/invocations"] * 3


def test_refused_connection_is_retried_max_attempts_times(local_aws: Any, refused_url: str) -> None:
    aws = local_aws(refused_url)

    status, code, _ = timed({"image": b64(png())}, aws, remaining_s=10.0)

    assert (status, code) == (502, "endpoint_unreachable")
    assert len(aws.sent) == 3


def test_no_attempt_without_time_for_one(local_aws: Any) -> None:
    with ScriptedService(invoke_ok()) as endpoint:
        aws = local_aws(endpoint.url)

        status, code, _ = timed({"image": b64(png())}, aws, remaining_s=handler.SAFETY_MARGIN_S + 0.2)

        assert (status, code) == (504, "endpoint_timeout")
        assert endpoint.requests == [] and aws.sent == []


def test_slow_s3_leaves_the_endpoint_only_what_is_left(local_aws: Any) -> None:
    image = png()
    with (ScriptedService(Reply(200, image, {"Content-Type": "image/png"}, after_s=1.0)) as s3,
          ScriptedService(Reply(after_s=math.inf)) as endpoint):
        aws = local_aws(endpoint.url, s3.url)

        status, code, taken = timed({"s3_uri": "s3://images/cat.png"}, aws, remaining_s=3.0,
                                    env={"ALLOWED_BUCKETS": "images"})

        assert (status, code) == (504, "endpoint_timeout")
        assert taken < 3.0
        assert s3.requests == ["GET /images/cat.png"]
        assert len(endpoint.requests) == 1


def test_s3_that_does_not_answer_is_504_before_lambdas_timeout(local_aws: Any) -> None:
    with ScriptedService(Reply(after_s=math.inf)) as s3, ScriptedService(invoke_ok()) as endpoint:
        aws = local_aws(endpoint.url, s3.url)

        status, code, taken = timed({"s3_uri": "s3://images/cat.png"}, aws, remaining_s=2.0,
                                    env={"ALLOWED_BUCKETS": "images"})

        assert (status, code) == (504, "s3_timeout")
        assert taken < 2.0
        assert len(s3.requests) == 1 and endpoint.requests == []


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


# --- asynchronous endpoints (moto S3, stubbed InvokeEndpointAsync) ----------------------------

ASYNC_ENV = {"ASYNC_INPUT_S3_URI": "s3://images/async-in", "ALLOWED_BUCKETS": "images"}


def expect_async(call: Harness, input_location: str | None, content_type: str) -> list[str]:
    """Answer one InvokeEndpointAsync (from ``input_location``; None: any); the input location it
    was sent is appended to the result."""
    sent: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(params["InputLocation"])

    call.runtime.meta.events.register("provide-client-params.sagemaker-runtime.InvokeEndpointAsync", record)
    call.stub.add_response(
        "invoke_endpoint_async",
        {"InferenceId": "inf-1", "OutputLocation": "s3://images/async-out/inf-1.out",
         "FailureLocation": "s3://images/async-failed/inf-1.out"},
        expected_params={"EndpointName": ENDPOINT, "ContentType": content_type, "Accept": "application/json",
                         "InputLocation": ANY if input_location is None else input_location},
    )
    return sent


def test_async_inline_image_is_stored_then_queued_and_answered_202(s3: Any) -> None:
    call = Harness(ASYNC_ENV, s3=s3)
    image = png()
    sent = expect_async(call, None, "image/png")

    status, _, body = call(http_api_event(json.dumps({"image": b64(image)})))

    assert status == 202
    assert body == {"inference_id": "inf-1", "input_location": sent[0],
                    "output_location": "s3://images/async-out/inf-1.out",
                    "failure_location": "s3://images/async-failed/inf-1.out"}
    assert re.fullmatch(r"s3://images/async-in/[0-9a-f]{32}\.png", sent[0])
    key = sent[0].removeprefix("s3://images/")
    stored = s3.get_object(Bucket="images", Key=key)
    assert stored["Body"].read() == image and stored["ContentType"] == "image/png"


def test_async_s3_reference_is_queued_as_it_is_even_above_the_real_time_limit(s3: Any) -> None:
    big = jpeg() + bytes(7 * 1024 * 1024)  # past InvokeEndpoint's 6 MB, within an async endpoint's 1 GB
    s3.put_object(Bucket="images", Key="scans/big.jpg", Body=big)
    call = Harness(ASYNC_ENV, s3=s3)
    expect_async(call, "s3://images/scans/big.jpg", "image/jpeg")

    status, _, body = call({"s3_uri": "s3://images/scans/big.jpg"})

    assert status == 202 and body["input_location"] == "s3://images/scans/big.jpg"
    assert [item["Key"] for item in s3.list_objects_v2(Bucket="images")["Contents"]] == ["scans/big.jpg"]


def test_async_refusals_queue_nothing(s3: Any) -> None:
    s3.put_object(Bucket="images", Key="notes.txt", Body=b"not an image at all")
    call = Harness({**ASYNC_ENV, "MAX_IMAGE_BYTES": "100"}, s3=s3)
    s3.put_object(Bucket="images", Key="big.png", Body=noisy_png())

    assert_error(*call({"s3_uri": "s3://images/notes.txt"}), 400, "unsupported_media_type")
    assert_error(*call({"s3_uri": "s3://images/big.png"}), 400, "payload_too_large")
    assert_error(*call({"s3_uri": "s3://images/none.png"}), 400, "s3_object_unavailable")
    assert_error(*call({"s3_uri": "s3://private/x.png"}), 400, "s3_not_allowed")
    assert_error(*call({"image": b64(b"plain text")}), 400, "unsupported_media_type")
    assert sorted(item["Key"] for item in s3.list_objects_v2(Bucket="images")["Contents"]) == ["big.png", "notes.txt"]


def test_async_endpoint_refusal_is_502_and_removes_the_stored_image(s3: Any) -> None:
    call = Harness(ASYNC_ENV, s3=s3)
    call.stub.add_client_error("invoke_endpoint_async", service_error_code="ValidationError",
                               service_message="Endpoint image-classifier-prod of account 1 not found.",
                               http_status_code=400)

    message = assert_error(*call({"image": b64(png())}), 502, "endpoint_not_found")

    assert "not found" in message
    assert s3.list_objects_v2(Bucket="images").get("KeyCount", 0) == 0  # the stored input is gone again


def test_async_settings() -> None:
    settings = handler.from_env({**ENV, "ASYNC_INPUT_S3_URI": "s3://bucket/in"})
    assert settings.async_input == handler.S3Object("bucket", "in/")
    assert settings.max_image_bytes == 1024 ** 3
    with pytest.raises(handler.ConfigError, match="ASYNC_INPUT_S3_URI"):
        handler.from_env({**ENV, "ASYNC_INPUT_S3_URI": "bucket/in"})
    with pytest.raises(handler.ConfigError, match="MAX_IMAGE_BYTES"):
        handler.from_env({**ENV, "MAX_IMAGE_BYTES": str(7 * 1024 * 1024)})  # past InvokeEndpoint's limit


# --- settings, clients and the entry point ----------------------------------------------------


def test_settings_defaults_and_parsing() -> None:
    assert handler.from_env(ENV) == handler.Settings(
        endpoint_name=ENDPOINT, allowed_origins=(), max_image_bytes=6 * 1024 * 1024, allowed_buckets=frozenset(),
        top_k=5, connect_timeout_s=1.0, read_timeout_s=60.0, max_attempts=3, gateway_timeout_s=29.0,
        log_level="INFO",
    )
    settings = handler.from_env({**ENV, "ALLOWED_ORIGINS": " https://a.com ,https://b.com,", "TOP_K": "3",
                                 "ALLOWED_BUCKETS": "x,y", "MAX_IMAGE_BYTES": "1000", "READ_TIMEOUT_S": "5.5",
                                 "MAX_ATTEMPTS": "1", "GATEWAY_TIMEOUT_S": "60"})
    assert settings.allowed_origins == ("https://a.com", "https://b.com")
    assert settings.allowed_buckets == {"x", "y"}
    assert (settings.top_k, settings.max_image_bytes, settings.read_timeout_s) == (3, 1000, 5.5)
    assert (settings.max_attempts, settings.gateway_timeout_s) == (1, 60.0)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "ENDPOINT_NAME"),
        ({"ENDPOINT_NAME": "bad_name!"}, "ENDPOINT_NAME='bad_name!'"),
        ({**ENV, "MAX_IMAGE_BYTES": "lots"}, "MAX_IMAGE_BYTES='lots'"),
        ({**ENV, "MAX_IMAGE_BYTES": "7000000"}, "MAX_IMAGE_BYTES='7000000'"),  # over InvokeEndpoint's limit
        ({**ENV, "TOP_K": "0"}, "TOP_K='0'"),
        ({**ENV, "READ_TIMEOUT_S": "-1"}, "READ_TIMEOUT_S='-1'"),
        ({**ENV, "MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS='0'"),
        ({**ENV, "GATEWAY_TIMEOUT_S": "soon"}, "GATEWAY_TIMEOUT_S='soon'"),
        ({**ENV, "LOG_LEVEL": "chatty"}, "LOG_LEVEL='CHATTY'"),
    ],
)
def test_settings_errors_name_the_key_and_value(env: dict[str, str], named: str) -> None:
    with pytest.raises(handler.ConfigError, match=re.escape(named)):
        handler.from_env(env)


def test_clients_are_kept_per_service_and_timeouts() -> None:
    built: list[tuple[str, Any]] = []
    clients = handler.Clients(lambda service, config: built.append((service, config)) or object())

    first = clients.get("sagemaker-runtime", 1.5, 27.5)
    assert clients.get("sagemaker-runtime", 1.5, 27.5) is first
    assert clients.get("sagemaker-runtime", 1.5, 27.0) is not first
    assert clients.get("s3", 1.5, 27.5) is not first
    assert [service for service, _ in built] == ["sagemaker-runtime", "sagemaker-runtime", "s3"]
    config = built[0][1]
    assert config.retries == {"total_max_attempts": 1, "mode": "standard"}  # the handler retries, not botocore
    assert (config.connect_timeout, config.read_timeout) == (1.5, 27.5)

    for read in range(handler.MAX_CLIENTS):
        clients.get("s3", 1.0, float(read + 1))
    assert clients.get("sagemaker-runtime", 1.5, 27.5) is not first  # the oldest made way


def test_default_client_is_a_real_sagemaker_runtime_client() -> None:
    client = handler.Clients().get("sagemaker-runtime", 1.0, 8.0)

    assert client.meta.service_model.service_name == "sagemaker-runtime"
    assert (client.meta.config.connect_timeout, client.meta.config.read_timeout) == (1.0, 8.0)
    assert client.meta.config.retries == {"total_max_attempts": 1, "mode": "standard"}


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

        yield settings, handler.Clients(factory), adapter.requests
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
