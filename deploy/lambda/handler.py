"""AWS Lambda function that classifies one image with the SageMaker endpoint.

Put it behind API Gateway (REST or HTTP API, Lambda proxy integration) or invoke it directly.
Python 3.11; only the standard library and boto3/botocore, which the Lambda runtime provides.
Deploy this one file with handler ``handler.handler``.

Requests (all the same to the function):

* API Gateway, the image itself as the body (``Content-Type: image/jpeg`` etc.; API Gateway must
  pass it base64-encoded: binary media types on a REST API, automatic on an HTTP API);
* API Gateway or direct invocation, a JSON object with exactly one of
  ``{"image": "<base64>"}`` (a ``data:image/...;base64,`` prefix is allowed),
  ``{"s3": {"bucket": "...", "key": "..."}}`` or ``{"s3_uri": "s3://bucket/key"}``.

Lambda limits a synchronous event to 6 MB, so an inline image (base64, 4 characters per 3 bytes)
can be at most about 4.4 MB; send larger ones as S3 references.

With ``ASYNC_INPUT_S3_URI`` set, the endpoint is an asynchronous one and the function only submits
work: an inline image is stored under that prefix, an S3 reference is passed on as it is (up to
1 GB, never read but for its first bytes), and the answer is 202 with
``{"inference_id", "input_location", "output_location", "failure_location"}``; the prediction appears at
``output_location`` when the endpoint has run it (its SNS topics, if any, say when).

The image type is detected from its first bytes (JPEG, PNG, WebP, GIF, BMP, TIFF), never taken
from the client. The answer is always an API Gateway proxy response (a direct invoker reads
``statusCode`` and ``json.loads(body)``): ``{"predictions": [{"label", "index", "probability"}]}``
or ``{"error": {"code", "message"}}``. 400 = bad request, 502 = the endpoint (or S3) answered an
error or could not be reached, 504 = it did not answer in time, 500 = the function itself is
misconfigured.

Environment (read once per Lambda container, see :func:`from_env`):

==================  =========================================================================
ENDPOINT_NAME       the SageMaker endpoint (required)
ALLOWED_ORIGINS     CORS: ``*`` or a comma list of origins; unset = no CORS headers
MAX_IMAGE_BYTES     largest image accepted, default 6 MiB (InvokeEndpoint's own limit)
ALLOWED_BUCKETS     comma list of buckets S3 references may name; unset = S3 references refused
TOP_K               predictions returned at most, default 5
CONNECT_TIMEOUT_S   longest wait to connect to AWS, default 1 (at most half the time left)
READ_TIMEOUT_S      longest wait for an AWS answer, default 60 (a real-time endpoint's own
                    limit); never past the time left
MAX_ATTEMPTS        tries per AWS call, first included, default 3. Only a call that never reached
                    the service (connection refused or not made in time) or that was throttled is
                    tried again; one that timed out waiting for the model never is
GATEWAY_TIMEOUT_S   API Gateway's integration timeout, default 29; API Gateway events are
                    answered before it
ASYNC_INPUT_S3_URI  an asynchronous endpoint: where inline images are stored for it
                    (``s3://bucket/prefix/``); MAX_IMAGE_BYTES then defaults to, and may reach, 1 GiB
LOG_LEVEL           default INFO
==================  =========================================================================

The function's role needs ``sagemaker:InvokeEndpoint`` on the endpoint and, for S3 references,
``s3:GetObject`` on the allowed buckets; for an asynchronous endpoint, ``sagemaker:InvokeEndpointAsync``
instead and ``s3:PutObject`` under ASYNC_INPUT_S3_URI.

Worst case: every AWS call's timeouts are cut from the time left, which is the smaller of the
function's remaining time (``context.get_remaining_time_in_millis()``) and, for API Gateway events,
GATEWAY_TIMEOUT_S counted from when API Gateway received the request, less half a second. So a slow
S3 object, a slow endpoint and retries together end in this function's own 504 answer about half a
second before the earlier of the two timeouts, whatever the function's timeout is (30 s suits API
Gateway). A read timeout is never retried: the endpoint runs the model for every request it has
received, so one slow image stays one model run.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
)

logger = logging.getLogger(__name__)

JSON = "application/json"
# InvokeEndpoint's Body limit in the sagemaker-runtime API model (6 MiB).
INVOKE_ENDPOINT_MAX_BYTES = 6 * 1024 * 1024
# What an asynchronous endpoint takes from S3 (InvokeEndpointAsync's input limit, 1 GB).
ASYNC_MAX_BYTES = 1024 * 1024 * 1024
# Enough of a file to tell its image type.
SNIFF_BYTES = 32
# SageMaker's endpoint name rule, from the same API model.
ENDPOINT_NAME_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
# What API Gateway's own CORS set-up allows by default.
CORS_ALLOW_HEADERS = "Content-Type, Authorization, X-Api-Key, X-Amz-Date, X-Amz-Security-Token"
PREDICTION_FIELDS = ("label", "index", "probability")
# Answer this long before the deadline: time to build the response and hand it back to Lambda.
SAFETY_MARGIN_S = 0.5
# Timeouts are rounded down to this step, so invocations with about the same time left share a
# client and its open connections; an attempt needs at least two steps (connect and read).
TIMEOUT_STEP_S = 0.25
# Retries wait a random time up to BACKOFF_BASE_S * 2**(attempt - 1), at most BACKOFF_MAX_S.
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 2.0
# Errors meaning "refused before doing any work" (botocore's throttling codes that
# sagemaker-runtime and S3 send), so trying again costs no model run.
THROTTLING_CODES = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException", "SlowDown",
                              "RequestLimitExceeded"})
# Clients kept per Lambda container (one per service and pair of timeouts in use).
MAX_CLIENTS = 8

T = TypeVar("T")


# --- settings ---------------------------------------------------------------------------------


class ConfigError(Exception):
    """The function's environment is wrong; the message names the variable and its value."""


@dataclass(frozen=True)
class Settings:
    endpoint_name: str
    allowed_origins: tuple[str, ...] = ()
    max_image_bytes: int = INVOKE_ENDPOINT_MAX_BYTES
    allowed_buckets: frozenset[str] = frozenset()
    top_k: int = 5
    connect_timeout_s: float = 1.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3
    gateway_timeout_s: float = 29.0
    log_level: str = "INFO"
    async_input: S3Object | None = None  # an asynchronous endpoint: inline images go under this prefix


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _number(environ: Mapping[str, str], key: str, default: float, kind: type, low: float, high: float) -> Any:
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(f"{key}={raw!r} is not a {kind.__name__} between {low} and {high}")
    return value


def from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    """Build the settings from an environment mapping (tests pass a dict)."""
    endpoint_name = environ.get("ENDPOINT_NAME", "").strip()
    if not endpoint_name:
        raise ConfigError("ENDPOINT_NAME is not set; set it to the SageMaker endpoint's name")
    if not ENDPOINT_NAME_PATTERN.fullmatch(endpoint_name):
        raise ConfigError(f"ENDPOINT_NAME={endpoint_name!r} is not a valid SageMaker endpoint name")
    log_level = environ.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL={log_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    async_input = None
    if environ.get("ASYNC_INPUT_S3_URI", "").strip():
        uri = environ["ASYNC_INPUT_S3_URI"].strip()
        match = re.fullmatch(r"s3://([^/]+)/(.*)", uri)
        if match is None:
            raise ConfigError(f"ASYNC_INPUT_S3_URI={uri!r} is not an s3://bucket/prefix/ URI")
        prefix = match[2] if not match[2] or match[2].endswith("/") else match[2] + "/"
        async_input = S3Object(match[1], prefix)
    max_bytes = ASYNC_MAX_BYTES if async_input else INVOKE_ENDPOINT_MAX_BYTES
    return Settings(
        endpoint_name=endpoint_name,
        allowed_origins=_split(environ.get("ALLOWED_ORIGINS", "")),
        max_image_bytes=_number(environ, "MAX_IMAGE_BYTES", max_bytes, int, 1, max_bytes),
        allowed_buckets=frozenset(_split(environ.get("ALLOWED_BUCKETS", ""))),
        top_k=_number(environ, "TOP_K", 5, int, 1, 1000),
        connect_timeout_s=_number(environ, "CONNECT_TIMEOUT_S", 1.0, float, 0.1, 60),
        read_timeout_s=_number(environ, "READ_TIMEOUT_S", 60.0, float, 0.1, 900),
        max_attempts=_number(environ, "MAX_ATTEMPTS", 3, int, 1, 10),
        gateway_timeout_s=_number(environ, "GATEWAY_TIMEOUT_S", 29.0, float, 1, 900),
        log_level=log_level,
        async_input=async_input,
    )


# --- time and AWS clients --------------------------------------------------------------------


@dataclass(frozen=True)
class Deadline:
    """When the answer must be ready, on ``time.monotonic()``'s clock (``math.inf``: no limit)."""

    at: float

    def left(self) -> float:
        return self.at - time.monotonic()


def deadline_for(event: Any, context: Any, settings: Settings) -> Deadline:
    """Before Lambda's timeout and, for an API Gateway event, before API Gateway's, less a margin."""
    limits = [math.inf]
    if context is not None:
        limits.append(context.get_remaining_time_in_millis() / 1000)
    if isinstance(event, Mapping) and is_proxy_event(event):
        limits.append(settings.gateway_timeout_s - gateway_waited_s(event, settings.gateway_timeout_s))
    return Deadline(time.monotonic() + min(limits) - SAFETY_MARGIN_S)


def gateway_waited_s(event: Mapping[str, Any], gateway_timeout_s: float) -> float:
    """How long API Gateway has been waiting (a cold start included), from its request time stamp.

    A stamp in the future or older than the gateway's timeout cannot belong to a request that API
    Gateway still waits for (a stored sample event, say), so it counts as no wait.
    """
    context = _mapping(event.get("requestContext"))
    stamp_ms = context.get("requestTimeEpoch") or context.get("timeEpoch")  # REST API, HTTP API
    if not isinstance(stamp_ms, (int, float)):
        return 0.0
    waited = time.time() - stamp_ms / 1000
    return waited if 0 <= waited < gateway_timeout_s else 0.0


def _round_down(seconds: float) -> float:
    return seconds if math.isinf(seconds) else math.floor(seconds / TIMEOUT_STEP_S) * TIMEOUT_STEP_S


def attempt_timeouts(settings: Settings, left_s: float) -> tuple[float, float] | None:
    """Connect and read timeouts for one attempt that must end within ``left_s``; None if too little is left.

    Connecting may take at most half of what is left; reading gets the rest, so the two together
    never outlast it.
    """
    connect = min(settings.connect_timeout_s, _round_down(left_s / 2))
    read = min(settings.read_timeout_s, _round_down(left_s - connect))
    return (connect, read) if connect > 0 and read > 0 else None


def client_config(connect_timeout_s: float, read_timeout_s: float) -> Config:
    return Config(
        # One attempt per call: call_aws retries. Both of botocore's retry modes also retry read
        # timeouts, and neither knows the invocation's deadline.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
    )


def make_client(service: str, config: Config) -> Any:
    return boto3.client(service, config=config)


class Clients:
    """boto3 clients kept per service and timeouts, so warm invocations reuse their connections.

    A client's timeouts are fixed when it is built. A client per invocation would cost a few
    milliseconds and, above all, a new TLS connection every time. Rounded to TIMEOUT_STEP_S, the
    timeouts take few values (the time left at the start of an invocation hardly varies), so a
    handful of clients serve all invocations.
    """

    def __init__(self, factory: Callable[[str, Config], Any] | None = None) -> None:
        self._factory = factory
        self._built: dict[tuple[str, float, float], Any] = {}

    def get(self, service: str, connect_timeout_s: float, read_timeout_s: float) -> Any:
        key = (service, connect_timeout_s, read_timeout_s)
        if key not in self._built:
            if len(self._built) >= MAX_CLIENTS:
                del self._built[next(iter(self._built))]  # the oldest
            config = client_config(connect_timeout_s, read_timeout_s)
            self._built[key] = (self._factory or make_client)(service, config)
        return self._built[key]


class OutOfTime(Exception):
    """Too little of the invocation's time is left to make (another) AWS call."""


def is_safe_to_retry(exc: Exception) -> bool:
    """True when the request never reached the service, or the service refused it before any work."""
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code") in THROTTLING_CODES
    # Connection refused, unresolvable or not made in time: nothing was sent. A read timeout or a
    # dropped connection may come after the endpoint took the request, so they are not retried.
    return isinstance(exc, (EndpointConnectionError, ConnectTimeoutError))


def call_aws(clients: Clients, settings: Settings, deadline: Deadline, service: str,
             call: Callable[[Any], T]) -> T:
    """``call(client)`` with timeouts cut to the deadline, tried again only when that is safe and time is left."""
    attempt = 1
    while True:
        timeouts = attempt_timeouts(settings, deadline.left())
        if timeouts is None:
            raise OutOfTime(service)
        try:
            return call(clients.get(service, *timeouts))
        except Exception as exc:
            delay = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
            if (attempt == settings.max_attempts or not is_safe_to_retry(exc)
                    or attempt_timeouts(settings, deadline.left() - delay) is None):
                raise
            logger.warning("%s attempt %d of %d failed (%s); next in %.2f s",
                           service, attempt, settings.max_attempts, exc, delay)
        time.sleep(delay)
        attempt += 1


# --- errors and responses ---------------------------------------------------------------------


class RequestError(Exception):
    """An outcome other than success, with its HTTP status and a stable code for clients."""

    def __init__(self, status: HTTPStatus, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


def bad_request(code: str, message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, code, message)


def cors_headers(settings: Settings | None, origin: str | None, *, preflight: bool = False) -> dict[str, str]:
    if settings is None or not settings.allowed_origins:
        return {}
    if "*" in settings.allowed_origins:
        headers = {"Access-Control-Allow-Origin": "*"}
    elif origin and origin in settings.allowed_origins:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    else:
        return {"Vary": "Origin"}
    if preflight:
        headers |= {
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        }
    return headers


def respond(status: HTTPStatus, body: dict[str, Any] | None, cors: dict[str, str]) -> dict[str, Any]:
    headers = {"Content-Type": JSON, **cors} if body is not None else dict(cors)
    return {
        "statusCode": int(status),
        "headers": headers,
        "body": json.dumps(body) if body is not None else "",
        "isBase64Encoded": False,
    }


def error_response(error: RequestError, cors: dict[str, str]) -> dict[str, Any]:
    return respond(error.status, {"error": {"code": error.code, "message": error.message}}, cors)


# --- reading the request ----------------------------------------------------------------------


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class Request:
    method: str
    origin: str | None
    image: bytes | None = None
    s3: S3Object | None = None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def is_proxy_event(event: Mapping[str, Any]) -> bool:
    return any(key in event for key in ("httpMethod", "requestContext", "body"))


def b64decode(text: str, what: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    if len(compact) > 4 * (max_bytes // 3 + 1):
        raise too_large(f"more than {max_bytes} bytes", max_bytes)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("invalid_base64", f"{what} is not valid base64") from None


def too_large(size: str, max_bytes: int) -> RequestError:
    return bad_request("payload_too_large", f"the image is {size}; the limit is {max_bytes} bytes")


def parse_event(event: Any, settings: Settings) -> Request:
    if not isinstance(event, Mapping):
        raise bad_request("invalid_request", "the event must be a JSON object")
    if not is_proxy_event(event):
        return parse_payload(event, settings, method="POST", origin=None)

    headers = {str(k).lower(): str(v) for k, v in _mapping(event.get("headers")).items() if v is not None}
    http = _mapping(_mapping(event.get("requestContext")).get("http"))
    method = str(event.get("httpMethod") or http.get("method") or "POST").upper()
    origin = headers.get("origin")
    if method != "POST":
        return Request(method, origin)
    body = event.get("body")
    if not isinstance(body, str) or not body:
        raise bad_request("invalid_request", "the request has no body; send an image or a JSON object")
    if event.get("isBase64Encoded"):
        raw = b64decode(body, "the request body", settings.max_image_bytes)
    elif is_json(headers.get("content-type"), body.encode()):
        raw = body.encode()
    else:
        raise bad_request(
            "invalid_request",
            "the body is neither JSON nor a base64-encoded image "
            "(for a binary body, configure binary media types on API Gateway)",
        )
    if is_json(headers.get("content-type"), raw):
        return parse_payload(load_json(raw), settings, method=method, origin=origin)
    return Request(method, origin, image=raw)


def is_json(content_type: str | None, body: bytes) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == JSON or kind.endswith("+json") or body.lstrip()[:1] == b"{"


def load_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request("invalid_json", f"the body is not valid JSON: {exc}") from None


def parse_payload(payload: Any, settings: Settings, *, method: str, origin: str | None) -> Request:
    if not isinstance(payload, Mapping):
        raise bad_request("invalid_request", "the JSON body must be an object")
    given = [key for key in ("image", "s3", "s3_uri") if key in payload]
    if len(given) != 1:
        raise bad_request("invalid_request", 'send exactly one of "image", "s3" or "s3_uri"')
    if given[0] == "image":
        text = payload["image"]
        if not isinstance(text, str):
            raise bad_request("invalid_request", '"image" must be a base64 string')
        if text.startswith("data:") and ";base64," in text:
            text = text.split(";base64,", 1)[1]
        return Request(method, origin, image=b64decode(text, '"image"', settings.max_image_bytes))
    if given[0] == "s3":
        ref = payload["s3"]
        if not isinstance(ref, Mapping) or not all(isinstance(ref.get(k), str) and ref[k] for k in ("bucket", "key")):
            raise bad_request("invalid_request", '"s3" must be an object with non-empty "bucket" and "key"')
        target = S3Object(ref["bucket"], ref["key"])
    else:
        uri = payload["s3_uri"]
        match = re.fullmatch(r"s3://([^/]+)/(.+)", uri) if isinstance(uri, str) else None
        if match is None:
            raise bad_request("invalid_request", '"s3_uri" must look like s3://bucket/key')
        target = S3Object(match[1], match[2])
    if not settings.allowed_buckets:
        raise bad_request("s3_not_allowed", "this function does not accept S3 references")
    if target.bucket not in settings.allowed_buckets:
        raise bad_request("s3_not_allowed", f"bucket {target.bucket!r} is not one this function may read")
    return Request(method, origin, s3=target)


def read_from_s3(clients: Clients, settings: Settings, deadline: Deadline, target: S3Object,
                 call: Callable[[Any], T]) -> T:
    """An S3 read of ``target``; its failures become the function's own answers."""
    try:
        return call_aws(clients, settings, deadline, "s3", call)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "AccessDenied", "404", "403", "InvalidRange"):
            raise bad_request("s3_object_unavailable", f"{target} does not exist, is empty or cannot be read") from None
        logger.error("reading %s failed: %s", target, exc)
        raise RequestError(HTTPStatus.BAD_GATEWAY, "s3_error", f"reading {target} failed") from None
    except (OutOfTime, ReadTimeoutError, ConnectTimeoutError):
        raise RequestError(HTTPStatus.GATEWAY_TIMEOUT, "s3_timeout", f"reading {target} took too long") from None
    except (EndpointConnectionError, HTTPClientError) as exc:
        logger.error("reading %s failed: %s", target, exc)
        raise RequestError(HTTPStatus.BAD_GATEWAY, "s3_error", f"reading {target} failed") from None


def read_s3(clients: Clients, settings: Settings, deadline: Deadline, target: S3Object) -> bytes:
    def get(client: Any) -> bytes:
        response = client.get_object(Bucket=target.bucket, Key=target.key)
        with response["Body"] as body:
            if response.get("ContentLength", 0) > settings.max_image_bytes:
                raise too_large(f"{response['ContentLength']} bytes", settings.max_image_bytes)
            return body.read(settings.max_image_bytes + 1)

    data = read_from_s3(clients, settings, deadline, target, get)
    if len(data) > settings.max_image_bytes:
        raise too_large(f"more than {settings.max_image_bytes} bytes", settings.max_image_bytes)
    return data


def sniff_s3(clients: Clients, settings: Settings, deadline: Deadline, target: S3Object) -> str:
    """An S3 object's image type, from its first bytes only (an asynchronous input may be 1 GB)."""
    def head(client: Any) -> tuple[int, bytes]:
        response = client.get_object(Bucket=target.bucket, Key=target.key, Range=f"bytes=0-{SNIFF_BYTES - 1}")
        size = int(response.get("ContentRange", "/0").rsplit("/", 1)[1] or 0) or response.get("ContentLength", 0)
        with response["Body"] as body:
            return size, body.read(SNIFF_BYTES)

    size, first = read_from_s3(clients, settings, deadline, target, head)
    if size > settings.max_image_bytes:
        raise too_large(f"{size} bytes", settings.max_image_bytes)
    kind = sniff_image_type(first)
    if kind is None:
        raise bad_request("unsupported_media_type", f"{target} is not a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    return kind


def sniff_image_type(data: bytes) -> str | None:
    """The media type that the first bytes announce, or None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:2] == b"BM" and len(data) >= 26:
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


def check_image(data: bytes, max_bytes: int) -> str:
    if not data:
        raise bad_request("invalid_image", "the image is empty")
    if len(data) > max_bytes:
        raise too_large(f"{len(data)} bytes", max_bytes)
    kind = sniff_image_type(data)
    if kind is None:
        raise bad_request("unsupported_media_type", "the data is not a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    return kind


# --- calling the endpoint ---------------------------------------------------------------------


def container_message(original: str) -> str:
    """The container's own error message, out of its JSON error body when it sent one."""
    try:
        message = json.loads(original)["error"]["message"]
    except (ValueError, TypeError, KeyError):
        message = original
    return str(message).strip()[:500] or "no message"


def call_endpoint(clients: Clients, settings: Settings, deadline: Deadline, call: Callable[[Any], T],
                  too_slow: str) -> T:
    """A sagemaker-runtime call; its failures become the function's own answers."""
    try:
        return call_aws(clients, settings, deadline, "sagemaker-runtime", call)
    except ClientError as exc:
        raise endpoint_error(exc) from None
    except (OutOfTime, ReadTimeoutError, ConnectTimeoutError):
        raise RequestError(HTTPStatus.GATEWAY_TIMEOUT, "endpoint_timeout", too_slow) from None
    except (EndpointConnectionError, HTTPClientError) as exc:
        logger.error("cannot reach the endpoint: %s", exc)
        raise RequestError(HTTPStatus.BAD_GATEWAY, "endpoint_unreachable",
                           "the model endpoint could not be reached") from None


def invoke(clients: Clients, settings: Settings, deadline: Deadline, image: bytes, content_type: str
           ) -> list[dict[str, Any]]:
    def post(client: Any) -> bytes:
        response = client.invoke_endpoint(
            EndpointName=settings.endpoint_name, ContentType=content_type, Accept=JSON, Body=image
        )
        return response["Body"].read()

    raw = call_endpoint(clients, settings, deadline, post, "the model endpoint did not answer in time")
    try:
        predictions = json.loads(raw)["predictions"]
        if not isinstance(predictions, list):
            raise TypeError("predictions is not a list")
        return [{k: p[k] for k in PREDICTION_FIELDS if k in p} for p in predictions[: settings.top_k]]
    except (ValueError, TypeError, KeyError):
        logger.error("the endpoint answered 200 with an unexpected body: %r", raw[:200])
        raise RequestError(HTTPStatus.BAD_GATEWAY, "invalid_model_response",
                           "the model endpoint answered with an unexpected body") from None


EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif",
              "image/bmp": "bmp", "image/tiff": "tiff"}


def store_input(clients: Clients, settings: Settings, deadline: Deadline, image: bytes, content_type: str
                ) -> S3Object:
    """Put an inline image under ASYNC_INPUT_S3_URI, where the asynchronous endpoint reads it."""
    assert settings.async_input is not None
    target = S3Object(settings.async_input.bucket,
                      f"{settings.async_input.key}{uuid.uuid4().hex}.{EXTENSIONS[content_type]}")

    def put(client: Any) -> None:
        client.put_object(Bucket=target.bucket, Key=target.key, Body=image, ContentType=content_type)

    try:
        call_aws(clients, settings, deadline, "s3", put)
    except (OutOfTime, ReadTimeoutError, ConnectTimeoutError):
        raise RequestError(HTTPStatus.GATEWAY_TIMEOUT, "s3_timeout", "storing the image took too long") from None
    except (ClientError, EndpointConnectionError, HTTPClientError) as exc:
        logger.error("storing %s failed: %s", target, exc)
        raise RequestError(HTTPStatus.BAD_GATEWAY, "s3_error", "the image could not be stored for the "
                                                               "asynchronous endpoint") from None
    return target


def submit(clients: Clients, settings: Settings, deadline: Deadline, image: bytes | None, source: S3Object | None,
           content_type: str) -> dict[str, str]:
    """Queue one image on the asynchronous endpoint (an inline one stored first); where its answer
    will be."""
    stored = source is None
    location = store_input(clients, settings, deadline, image or b"", content_type) if source is None else source

    def post(client: Any) -> dict[str, Any]:
        return client.invoke_endpoint_async(EndpointName=settings.endpoint_name, InputLocation=str(location),
                                            ContentType=content_type, Accept=JSON)

    try:
        response = call_endpoint(clients, settings, deadline, post,
                                 "the model endpoint did not take the request in time")
    except RequestError:
        if stored:  # nothing will read it: leave no orphan behind
            try:
                call_aws(clients, settings, deadline, "s3",
                         lambda client: client.delete_object(Bucket=location.bucket, Key=location.key))
            except Exception as exc:
                logger.warning("could not delete %s: %s", location, exc)
        raise
    return {"inference_id": response.get("InferenceId", ""), "input_location": str(location),
            "output_location": response.get("OutputLocation", ""),
            "failure_location": response.get("FailureLocation", "")}


def endpoint_error(exc: ClientError) -> RequestError:
    """InvokeEndpoint's error, told in words a client can act on, without account details."""
    response = exc.response
    code = response.get("Error", {}).get("Code", "")
    message = response.get("Error", {}).get("Message", "")
    logger.warning("InvokeEndpoint failed: %s: %s %s", code, message, response.get("LogStreamArn", ""))
    if code == "ModelError":
        status = response.get("OriginalStatusCode")
        detail = container_message(response.get("OriginalMessage") or message)
        if isinstance(status, int) and status >= 500:
            return RequestError(HTTPStatus.BAD_GATEWAY, "model_error", f"the model endpoint failed: {detail}")
        return RequestError(HTTPStatus.BAD_GATEWAY, "model_error", f"the model endpoint rejected the image: {detail}")
    if code == "ValidationError" and "not found" in message.lower():
        return RequestError(HTTPStatus.BAD_GATEWAY, "endpoint_not_found", "the model endpoint was not found")
    if code in ("ModelNotReadyException", "ServiceUnavailable", "ThrottlingException", "InternalFailure",
                "InternalDependencyException"):
        return RequestError(HTTPStatus.BAD_GATEWAY, "endpoint_unavailable",
                            f"the model endpoint is unavailable ({code}); try again later")
    return RequestError(HTTPStatus.BAD_GATEWAY, "endpoint_error", f"the model endpoint refused the request ({code})")


# --- the handler ------------------------------------------------------------------------------


def handle(event: Any, settings: Settings, clients: Clients, context: Any = None) -> dict[str, Any]:
    """One event in, one API Gateway proxy response out. Everything but wiring happens here.

    ``context`` is Lambda's (only ``get_remaining_time_in_millis`` is used); None means no time limit
    but API Gateway's.
    """
    started = time.monotonic()
    origin: str | None = None
    outcome, detail = "500 internal_error", ""
    try:
        deadline = deadline_for(event, context, settings)
        request = parse_event(event, settings)
        origin = request.origin
        if request.method == "OPTIONS":
            outcome = "preflight"
            return respond(HTTPStatus.NO_CONTENT, None, cors_headers(settings, origin, preflight=True))
        if request.method != "POST":
            raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", "use POST")
        if settings.async_input is not None:
            if request.s3 is not None:
                content_type = sniff_s3(clients, settings, deadline, request.s3)
            else:
                content_type = check_image(request.image or b"", settings.max_image_bytes)
            source = str(request.s3) if request.s3 else f"{len(request.image or b'')} bytes"
            detail = f" ({content_type}, {source}, asynchronous)"
            queued = submit(clients, settings, deadline, request.image, request.s3, content_type)
            outcome = "202 accepted"
            return respond(HTTPStatus.ACCEPTED, queued, cors_headers(settings, origin))
        image = request.image if request.s3 is None else read_s3(clients, settings, deadline, request.s3)
        content_type = check_image(image or b"", settings.max_image_bytes)
        detail = f" ({content_type}, {len(image or b'')} bytes{', from ' + str(request.s3) if request.s3 else ''})"
        predictions = invoke(clients, settings, deadline, image or b"", content_type)
        outcome = "200 ok"
        return respond(HTTPStatus.OK, {"predictions": predictions}, cors_headers(settings, origin))
    except RequestError as error:
        outcome = f"{int(error.status)} {error.code}: {error.message}"
        return error_response(error, cors_headers(settings, origin))
    except Exception:
        logger.exception("unexpected failure")
        error = RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "the request could not be handled")
        return error_response(error, cors_headers(settings, origin))
    finally:
        logger.info("request %s in %.0f ms%s", outcome, 1000 * (time.monotonic() - started), detail)


_STATE: tuple[Settings, Clients] | None = None


def _state() -> tuple[Settings, Clients]:
    global _STATE
    if _STATE is None:
        settings = from_env(os.environ)
        logger.setLevel(settings.log_level)
        _STATE = (settings, Clients())
    return _STATE


def handler(event: Any, context: Any) -> dict[str, Any]:
    """The Lambda entry point."""
    try:
        settings, clients = _state()
    except ConfigError as exc:
        logger.error("misconfigured: %s", exc)
        error = RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "misconfigured",
                             "the function is misconfigured; its logs say how")
        return error_response(error, {})
    return handle(event, settings, clients, context)
