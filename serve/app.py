"""HTTP routes only: SageMaker's ``GET /ping`` and ``POST /invocations``.

``create_app(settings, load_predictor)`` builds the app; the model loads in a background thread
when the server starts, so the port answers at once and ``/ping`` says 503 until the model has
loaded and served a warm-up inference (200), or for good if loading failed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from serve.codec import choose_response_type, decode_image, encode_predictions
from serve.errors import NotReady, PayloadTooLarge, ServingError
from serve.settings import Settings

if TYPE_CHECKING:
    from serve.predictor import Predictor

logger = logging.getLogger(__name__)


class Health(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelState:
    """Where model loading stands; read by /ping, written once by the loader thread."""

    def __init__(self) -> None:
        self.health = Health.LOADING
        self.predictor: Predictor | None = None
        self.reason = ""

    def load(self, load_predictor: Callable[[], Predictor]) -> None:
        try:
            predictor = load_predictor()
            predictor.warm_up()
        except Exception as exc:
            logger.exception("model failed to load")
            self.reason = f"{type(exc).__name__}: {exc}"
            self.health = Health.FAILED
            return
        self.predictor = predictor
        self.health = Health.READY
        logger.info("model ready")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, load_predictor: Callable[[], Predictor]) -> FastAPI:
    state = ModelState()
    # One forward pass at a time: torch already spreads a pass over all cores.
    inference_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, args=(load_predictor,), name="model-loader", daemon=True)
        loader.start()
        yield

    app = FastAPI(title="Image classifier", lifespan=lifespan)
    app.state.model = state

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(ServingError().body(), status_code=500)

    @app.get("/ping")
    async def ping() -> JSONResponse:
        if state.health is Health.READY:
            return JSONResponse({"status": state.health.value})
        body = {"status": state.health.value}
        if state.reason:
            body["reason"] = state.reason
        return JSONResponse(body, status_code=503)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        predictor = state.predictor
        if predictor is None:
            raise NotReady(f"the model is {state.health.value}", headers={"Retry-After": "5"})
        response_type = choose_response_type(request.headers.get("accept"))
        body = await read_body(request, settings.max_body_bytes)
        image = await run_in_threadpool(
            decode_image, body, request.headers.get("content-type"), max_pixels=settings.max_image_pixels
        )

        def predict() -> bytes:
            with inference_lock:
                (predictions,) = predictor.predict([image], settings.top_k)
            return encode_predictions(predictions)

        payload = await asyncio.to_thread(predict)
        return Response(payload, media_type=response_type)

    return app
