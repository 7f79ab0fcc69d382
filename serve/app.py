"""HTTP routes: SageMaker's ``GET /ping``, ``POST /invocations`` and ``GET /execution-parameters``,
plus ``GET /metrics`` (Prometheus) and the OpenAPI docs (``/docs``); in multi-model mode also
SageMaker's ``/models`` API (see :mod:`serve.multi_model`).

``create_app(settings, load_predictor)`` builds the app around a :class:`~serve.service.Service`,
which owns the models and the threads that run them. This module reads requests (headers, and
the body within its limits), calls the service, and maps its errors to JSON answers. The model
loads while the port already answers: ``/ping`` says 503 until the model has loaded and served a
warm-up inference (200), or for good if loading failed. ``/ping`` also says 503 while an
inference has been running for longer than the request timeout: the inference path is stuck, and
the platform should replace the instance. In multi-model mode ``/ping`` is 200 as soon as the
server runs: models come and go through ``/models``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from serve import codec
from serve.admission import RequestLimit, SpooledBody, read_body
from serve.errors import BadRequest, ServingError
from serve.handlers import HandlerModel
from serve.multi_model import TARGET_MODEL_HEADER, models_router
from serve.observe import Observe
from serve.predictor import Predictor
from serve.registry import LoadedModel
from serve.service import Health, Service
from serve.settings import MEGABYTE, Settings

logger = logging.getLogger(__name__)
DEMO_PAGE = Path(__file__).with_name("static") / "demo.html"
REQUEST_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {kind: {"schema": {"type": "string", "format": "binary"}} for kind in sorted(codec.IMAGE_TYPES)}
        | {
            codec.JSON: {"example": {"instances": [{"b64": "<base64 image>"}]}},
            codec.JSON_LINES: {"schema": {"type": "string"}, "example": '{"b64": "<base64 image>"}\n'},
            codec.NPY: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def create_app(settings: Settings, load_predictor: Callable[[], Predictor | HandlerModel] | None = None, *,
               load_model: Callable[[Path], Predictor | HandlerModel] | None = None) -> FastAPI:
    """The server. One model from ``load_predictor``, or in multi-model mode any number from
    ``load_model(folder)`` as ``POST /models`` asks."""
    service = Service(settings, load_predictor=load_predictor, load_model=load_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="Image classifier", version="1", lifespan=lifespan,
                  description="SageMaker-compatible image classification server.")
    app.state.service = service
    # Observe wraps RequestLimit (middleware added last runs first), so refusals are counted and logged.
    app.add_middleware(RequestLimit, limit=settings.max_concurrent_requests)
    app.add_middleware(Observe, metrics=service.metrics, access_log=settings.access_log)

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())
        return JSONResponse(BadRequest(problems).body(), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is left to answer; 499 (as nginx logs it) records that in the access log and metrics.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        # Answered outside the Observe middleware: add its request id here.
        request_id = getattr(request.state, "request_id", None)
        return JSONResponse(ServingError().body(), status_code=500,
                            headers={"X-Request-Id": request_id} if request_id else None)

    if settings.demo:
        demo_page = DEMO_PAGE.read_text()

        @app.get("/", summary="A page to try the model in a browser", response_class=HTMLResponse)
        async def demo() -> HTMLResponse:
            return HTMLResponse(demo_page)

    @app.get("/ping", summary="Health: 200 once the model is loaded and warmed up")
    async def ping() -> JSONResponse:
        running_s = service.longest_inference_s()
        if running_s > settings.request_timeout_s:
            return JSONResponse({"status": "stuck", "reason": f"an inference has been running for {running_s:.0f} s, "
                                 f"longer than the {settings.request_timeout_s:g} s request timeout"}, status_code=503)
        body = {"status": service.health.value}
        if service.health is Health.READY:
            return JSONResponse(body)
        if service.reason:
            body["reason"] = service.reason
        return JSONResponse(body, status_code=503)

    @app.get("/execution-parameters", summary="Batch Transform's preferred settings")
    async def execution_parameters() -> JSONResponse:
        return JSONResponse({
            "MaxConcurrentTransforms": settings.max_concurrent_transforms,
            "BatchStrategy": settings.batch_strategy,
            "MaxPayloadInMB": max(1, settings.max_body_bytes // MEGABYTE),
        })

    @app.get("/metrics", summary="Prometheus metrics of the server, every worker process together")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def receive(request: Request, model: LoadedModel) -> bytes | SpooledBody:
        """The body: one image above spool_body_bytes is streamed to disk as it arrives; any other
        body is held in memory (parsed whole, or handed to handlers as bytes), so it may be at most
        max_memory_body_bytes when that is set."""
        for_handlers = isinstance(model.predictor, HandlerModel)
        one_image = not for_handlers and codec.is_one_image(request.headers.get("content-type"))
        limit, note = settings.max_body_bytes, ""
        memory = settings.max_memory_body_bytes
        if not one_image and memory is not None and memory < limit:
            limit = memory
            note = (" for a body handed to the model's handlers (CLASSIFIER_MAX_MEMORY_BODY_MB)" if for_handlers else
                    f" for this content type; only one image may be larger, up to {settings.max_body_bytes} bytes")
        return await read_body(request, limit, settings.body_timeout_s, limit_note=note,
                               spool_above=settings.spool_body_bytes if one_image else None,
                               spool_dir=settings.spool_dir)

    async def serve_request(request: Request, model: LoadedModel) -> Response:
        """A request for ``model``: its headers checked, then its body read, answered by the service."""
        headers = request.headers
        invocation = service.invocation(model, content_type=headers.get("content-type"), accept=headers.get("accept"),
                                        custom_attributes=headers.get("x-amzn-sagemaker-custom-attributes"),
                                        headers={key.lower(): value for key, value in headers.items()})
        reply = await service.invoke(model, invocation, await receive(request, model))
        return Response(reply.payload, media_type=reply.media_type, headers={"Server-Timing": reply.server_timing})

    def target_model(request: Request) -> LoadedModel:
        if not settings.multi_model:
            return service.model()
        name = request.headers.get(TARGET_MODEL_HEADER)
        if not name:
            raise BadRequest(f"this server hosts several models: invoke /models/<name>/invoke or name one "
                             f"in the {TARGET_MODEL_HEADER} header")
        return service.model(name)

    @app.post("/invocations", summary="Classify images", openapi_extra=REQUEST_BODY_DOC)
    async def invocations(request: Request) -> Response:
        return await serve_request(request, target_model(request))

    if settings.multi_model:
        app.include_router(models_router(service.registry, serve_request, body_timeout_s=settings.body_timeout_s,
                                         openapi_extra=REQUEST_BODY_DOC))

    return app
