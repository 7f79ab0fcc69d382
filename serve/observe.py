"""Request ids, Prometheus metrics and the access log, as one plain ASGI middleware.

A plain ASGI wrapper (rather than Starlette's ``BaseHTTPMiddleware``) adds no extra task or
response streaming per request: it reads the id, wraps ``send`` to add the ``X-Request-Id``
header and to note the status, and records the request once the response is complete.

With several worker processes the server sets ``PROMETHEUS_MULTIPROC_DIR`` before starting them
(see :mod:`serve.server`): each worker then writes its values to its own files there, and a
scrape of any worker reads every worker's files.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values

access_logger = logging.getLogger("serve.access")
KNOWN_PATHS = frozenset({"/", "/ping", "/invocations", "/execution-parameters", "/metrics", "/models"})
MAX_REQUEST_ID = 200

Scope = dict[str, Any]
Message = dict[str, Any]


class Metrics:
    """Prometheus metrics of one app; ``registry`` is what ``/metrics`` exposes.

    In one process that is the app's own registry (no process-wide state, so tests build many
    apps side by side). In a worker of several it is a collector of every worker's files: counters
    and histograms summed over the workers, those that have exited included, so that a total never
    goes backwards when a worker is replaced. There are no gauges; one added later needs its
    ``multiprocess_mode`` chosen (``livesum`` for "in flight now", for instance).
    """

    def __init__(self) -> None:
        own = CollectorRegistry()
        self.requests = Counter("classifier_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=own)
        self.latency = Histogram("classifier_request_duration_seconds", "Request latency by path", ["path"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=own)
        self.batch_size = Histogram("classifier_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=own)
        self.images = Counter("classifier_images", "Images classified", registry=own)
        self.registry = own
        if shared_between_processes():
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)


def shared_between_processes() -> bool:
    """Whether this process writes its metric values to files its sibling workers read.

    prometheus_client makes that choice once, when it is imported, from ``PROMETHEUS_MULTIPROC_DIR``;
    asking it (rather than the environment now) means the scrape always reads where the values are.
    """
    return values.ValueClass is not values.MutexValue


def path_label(path: str) -> str:
    """A bounded set of metric labels: model names and unknown paths do not each get a series."""
    if path in KNOWN_PATHS:
        return path
    if path.startswith("/models/"):
        return "/models/{name}/invoke" if path.endswith("/invoke") else "/models/{name}"
    return "other"


def request_id_of(scope: Scope) -> str:
    """The caller's id (``X-Request-Id``, else SageMaker's ``X-Amzn-RequestId``), else a new one."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in (b"x-request-id", b"x-amzn-requestid"):
            found[name] = value
    value = found.get(b"x-request-id") or found.get(b"x-amzn-requestid")
    if value:
        return value[:MAX_REQUEST_ID].decode("latin-1")
    return uuid.uuid4().hex


class Observe:
    def __init__(self, app: Any, *, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.record(scope, status, time.perf_counter() - started, request_id)

    def record(self, scope: Scope, status: int, elapsed: float, request_id: str) -> None:
        label = path_label(scope["path"])
        self.metrics.requests.labels(label, str(status)).inc()
        self.metrics.latency.labels(label).observe(elapsed)
        if self.access_log and label != "/ping":
            # The path as JSON escapes it: a percent-encoded newline cannot forge a log line.
            access_logger.info("%s %s %d %.1f ms", scope["method"], json.dumps(scope["path"])[1:-1], status,
                               elapsed * 1000,
                               extra={"request_id": request_id, "status": status,
                                      "duration_ms": round(elapsed * 1000, 3)})
