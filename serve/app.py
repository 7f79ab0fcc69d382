"""HTTP routes: SageMaker's ``GET /ping``, ``POST /invocations`` and ``GET /execution-parameters``,
plus ``GET /metrics`` (Prometheus) and the OpenAPI docs (``/docs``); in multi-model mode also
SageMaker's ``/models`` API (see :mod:`serve.multi_model`).

``create_app(settings, load_predictor)`` builds the app; the model loads in a background thread
when the server starts, so the port answers at once and ``/ping`` says 503 until the model has
loaded and served a warm-up inference (200), or for good if loading failed (a failure that may
pass, such as running out of memory, is tried again first). Decoding runs on a thread pool and
inference on the inference threads behind the batcher, so the event loop (and ``/ping``) never
waits for either. ``/ping`` also says 503 while an inference has been running for longer than the
request timeout: the inference path is stuck, and the platform should replace the instance. In
multi-model mode ``/ping`` is 200 as soon as the server runs: models come and go through
``/models``.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import gc
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from serve import codec
from serve.admission import MemoryGate, RequestLimit, SpooledBody, read_body
from serve.batching import Batcher
from serve.errors import (
    BadRequest,
    InvalidTensor,
    ModelNotFound,
    NotReady,
    Overloaded,
    ServingError,
    Timeout,
)
from serve.handlers import HandlerModel
from serve.multi_model import TARGET_MODEL_HEADER, models_router
from serve.observe import Metrics, Observe
from serve.predictor import Predictor, select_device
from serve.registry import LoadedModel, ModelRegistry
from serve.s3 import S3Fetcher
from serve.settings import MEGABYTE, Settings

logger = logging.getLogger(__name__)
DEMO_PAGE = Path(__file__).with_name("static") / "demo.html"
# A single image up to this size, decoding to no more than this many pixels, is decoded by the CPU
# forward pass that classifies it (see serve.batching): a few milliseconds of decoding. Larger ones
# (by body or by pixels: a few kilobytes of PNG can hold tens of megapixels), every other body type
# and every body for a GPU are decoded beforehand on the decode pool, under the memory gate, so no
# slow decode holds up a batch or leaves the GPU idle; so is everything when one multi-threaded
# pass at a time has the cores (CLASSIFIER_INFERENCE_THREADS=1 on several), which would leave all
# but one idle while it decodes.
# Counting the pixels reads the image's header on the event loop: microseconds for a body this small.
DECODE_IN_PASS_MAX_BYTES = 256 * 1024
DECODE_IN_PASS_MAX_PIXELS = 2_000_000
ONE_IMAGE = codec.Inputs(single=True)
# A load that fails in a way that may pass (memory, I/O) is tried again after each of these delays.
LOAD_RETRY_DELAYS_S = (2.0, 5.0)
# An absolute path in a failure's text; /ping shows only its last part (the full text is logged).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"]+/)*([^\s/'\"]+)")
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


class Health(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class Served:
    """A model ready for requests: its predictor and the batcher that feeds it (None for a model
    served through its own handlers without batching: each request is one call of them)."""

    predictor: Predictor | HandlerModel
    batcher: Batcher | None


def may_pass(exc: BaseException) -> bool:
    """Whether a load failure may go away by itself (memory, I/O, the network), unlike a missing or
    malformed file, which no retry mends."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError, OSError))


def public_reason(exc: BaseException) -> str:
    """A failure as /ping shows it to anyone who asks: without the server's file paths."""
    return ABSOLUTE_PATH.sub(r"\1", f"{type(exc).__name__}: {exc}")


class ModelState:
    """Where loading the one model stands; read by /ping, written once by the loader thread."""

    def __init__(self) -> None:
        self.health = Health.LOADING
        self.predictor: Predictor | None = None
        self.reason = ""

    def load(self, load_predictor: Callable[[], Predictor], warm_up: Callable[[Predictor], None], *,
             retry_delays_s: tuple[float, ...] = LOAD_RETRY_DELAYS_S) -> None:
        for attempt, delay in enumerate((*retry_delays_s, None), start=1):
            try:
                predictor = load_predictor()
                warm_up(predictor)
                break
            except Exception as exc:
                if delay is None or not may_pass(exc):
                    logger.exception("model failed to load")
                    self.reason = public_reason(exc)
                    self.health = Health.FAILED
                    return
                logger.warning("model failed to load (attempt %d, %s: %s); trying again in %g s",
                               attempt, type(exc).__name__, exc, delay)
            predictor = None  # the next attempt must not need room for two copies
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            time.sleep(delay)
        self.predictor = predictor
        self.health = Health.READY
        logger.info("model ready")


class Load:
    """Requests admitted to a pool of threads, refused with 503 beyond ``limit``. Used on the event
    loop only. A request counts until its work has finished, even if it was answered 504 before."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._running: dict[object, float] = {}  # calls running on the pool's threads, and when each began

    def run(self, executor: ThreadPoolExecutor, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self.in_flight >= self.limit:
            raise Overloaded(f"{self.in_flight} requests are in progress; try again shortly",
                             headers={"Retry-After": "1"})
        future = asyncio.get_running_loop().run_in_executor(executor, self._timed, function, *args)
        self.in_flight += 1
        future.add_done_callback(self._release)
        return future

    def _timed(self, function: Callable[..., Any], *args: Any) -> Any:
        """On the pool's thread: ``function(*args)``, noted as running meanwhile."""
        token = object()
        self._running[token] = time.monotonic()
        try:
            return function(*args)
        finally:
            del self._running[token]

    def _release(self, future: asyncio.Future[Any]) -> None:
        self.in_flight -= 1

    def longest_s(self) -> float:
        """How long the oldest call running now has been running (0 when none is)."""
        started = self._running.copy().values()  # copied at once: pool threads change it
        return time.monotonic() - min(started) if started else 0.0


def create_app(settings: Settings, load_predictor: Callable[[], Predictor] | None = None, *,
               load_model: Callable[[Path], Predictor] | None = None) -> FastAPI:
    """The server. One model from ``load_predictor``, or in multi-model mode any number from
    ``load_model(folder)`` as ``POST /models`` asks."""
    if settings.multi_model and load_model is None:
        raise ValueError("multi-model mode needs load_model")
    if not settings.multi_model and load_predictor is None:
        raise ValueError("single-model mode needs load_predictor")
    state = ModelState()
    metrics = Metrics()
    # Multi-threaded torch work happens on one thread only, "inference": a lone forward pass with
    # every torch thread, and warm-ups. Each thread that runs a multi-threaded op owns an OpenMP
    # team, and with more team threads than cores libgomp stops spinning between parallel regions:
    # a second team made a lone EfficientNet-Lite0 pass 1.6x slower here. Passes side by side run
    # single-threaded on "inference-shared"; decoding and loading run torch single-threaded.
    decode_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="decode",
                                     initializer=torch.set_num_threads, initargs=(1,))
    wide_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    shared_pool = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="inference-shared")
    fetch_s3 = S3Fetcher(settings.s3_buckets) if settings.s3_buckets else None
    # Handler mode: user code runs here, off the event loop, at most handler_threads at a time,
    # each call with its share of the cores. Batched handlers run only input_fn and output_fn here,
    # single-threaded (as decoding is), while predict_fn passes have the cores: a second team of
    # torch threads beside the pass's own slowed a lone batched request down (bench/handler_load.py).
    handler_pool = ThreadPoolExecutor(max_workers=settings.handler_threads, thread_name_prefix="handler",
                                      initializer=torch.set_num_threads,
                                      initargs=(1 if settings.handler_batching else
                                                max(1, settings.threads_per_worker // settings.handler_threads),))
    handler_load = Load(limit=settings.handler_threads + settings.max_queue)
    decode_gate = MemoryGate(settings.decode_memory_bytes)
    single: list[Served] = []  # the one model, once loaded (single-model mode)

    def make_batcher(predictor: Predictor | HandlerModel, name: str | None = None) -> Batcher | None:
        options = {"closed_error": lambda: ModelNotFound(f"model {name!r} is not loaded")} if name else {}
        if isinstance(predictor, HandlerModel):
            if not predictor.batching:
                return None
            # Batched handlers: predict_fn calls on the handler threads, as many at once as unbatched
            # requests would run (CLASSIFIER_HANDLER_THREADS); one alone gets every torch thread.
            return Batcher(predictor.predict_batch, handler_pool, wide_executor=wide_pool,
                           max_batch_size=settings.max_batch_size, max_delay_s=settings.max_batch_delay_ms / 1000,
                           max_queue=settings.max_queue, parallel=settings.handler_threads,
                           threads=settings.threads_per_worker, isolate_failures=True,
                           on_batch=metrics.batch_size.observe, **options)
        # A GPU runs one pass at a time anyway; on a CPU, passes side by side use the cores best
        # (ONNX Runtime's too: each pass runs on the session for its thread count).
        parallel = 1 if predictor.device.type == "cuda" else settings.inference_threads
        return Batcher(predictor.infer, shared_pool, wide_executor=wide_pool, max_batch_size=settings.max_batch_size,
                       max_delay_s=settings.max_batch_delay_ms / 1000, max_queue=settings.max_queue,
                       parallel=parallel, threads=settings.threads_per_worker,
                       on_batch=metrics.batch_size.observe, **options)

    def warm_up(predictor: Predictor | HandlerModel) -> None:
        """One pass where lone requests will run: on the "inference" thread with every torch thread.
        A model served through its own handlers is ready once its model_fn has returned."""
        if isinstance(predictor, HandlerModel):
            return

        def run() -> None:
            torch.set_num_threads(settings.threads_per_worker)
            predictor.warm_up()

        wide_pool.submit(run).result()

    def single_threaded(function: Callable[[], Any]) -> Any:
        """``function()`` with one torch thread (passes side by side on this pool set their own)."""
        torch.set_num_threads(1)
        return function()

    def load_in_one_thread(model_dir: Path) -> Predictor:
        assert load_model is not None
        torch.set_num_threads(1)
        return load_model(model_dir)

    registry = ModelRegistry(
        load=load_in_one_thread, make_batcher=make_batcher, warm_up=warm_up, device=select_device(settings.device),
        budget_bytes=settings.model_memory_budget_bytes, reserve_bytes=settings.memory_reserve_bytes,
        evict=settings.evict_models, drain_timeout_s=settings.request_timeout_s, root=settings.models_root,
        program=settings.program,
    ) if load_model is not None else None

    def load_single() -> None:
        assert load_predictor is not None
        torch.set_num_threads(1)
        state.load(load_predictor, warm_up)
        if state.health is Health.FAILED and settings.failed_exit_s > 0 and settings.workers == 1:
            # SIGTERM stops the server the way the platform would; __main__ then exits with status 1.
            logger.error("the server exits in %g s: the model failed to load", settings.failed_exit_s)
            exit_timer = threading.Timer(settings.failed_exit_s, signal.raise_signal, (signal.SIGTERM,))
            exit_timer.daemon = True
            exit_timer.start()

    def longest_inference_s() -> float:
        """How long the oldest inference running now has been at it, whichever model it is for."""
        batchers = [served.batcher for served in single if served.batcher is not None]
        if registry is not None:
            batchers += registry.batchers()
        return max([handler_load.longest_s(), *(batcher.longest_pass_s() for batcher in batchers)])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.multi_model:
            state.health = Health.READY
        elif settings.workers > 1:
            # Worker processes share one listening socket: a worker that takes connections only
            # once its model is ready never answers 503 while a sibling says /ping 200. One whose
            # model failed to load fails its startup, which stops the server (see __main__).
            await asyncio.to_thread(load_single)
            if state.health is Health.FAILED and settings.failed_exit_s > 0:
                raise RuntimeError(f"the model failed to load: {state.reason}")
        else:
            # One process: take connections at once and let /ping report the loading.
            threading.Thread(target=load_single, name="model-loader", daemon=True).start()
        try:
            yield
        finally:
            for served in single:
                if served.batcher is not None:
                    await served.batcher.stop()
            if registry is not None:
                await registry.close()
            for pool in (decode_pool, wide_pool, shared_pool, handler_pool):
                pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Image classifier", version="1", lifespan=lifespan,
                  description="SageMaker-compatible image classification server.")
    app.state.model = state
    app.state.metrics = metrics
    app.state.registry = registry
    # Observe wraps RequestLimit (middleware added last runs first), so refusals are counted and logged.
    app.add_middleware(RequestLimit, limit=settings.max_concurrent_requests)
    app.add_middleware(Observe, metrics=metrics, access_log=settings.access_log)

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
        running_s = longest_inference_s()
        if running_s > settings.request_timeout_s:
            return JSONResponse({"status": "stuck", "reason": f"an inference has been running for {running_s:.0f} s, "
                                 f"longer than the {settings.request_timeout_s:g} s request timeout"}, status_code=503)
        if state.health is Health.READY:
            return JSONResponse({"status": state.health.value})
        body = {"status": state.health.value}
        if state.reason:
            body["reason"] = state.reason
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
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def decode_in_pass(predictor: Predictor) -> bool:
        """Whether this model's passes decode their own small images (see DECODE_IN_PASS_MAX_BYTES)."""
        return predictor.device.type == "cpu" and (
            settings.inference_threads > 1 or settings.threads_per_worker == 1)

    def prepare_image(predictor: Predictor, body: bytes) -> torch.Tensor:
        image = codec.decode_image(body, max_pixels=settings.max_image_pixels,
                                   min_side=predictor.resize_size if settings.fast_decode else None)
        return predictor.preprocess(image)[None]

    def prepare(predictor: Predictor, body: bytes | BinaryIO | SpooledBody,
                content_type: str | None) -> tuple[torch.Tensor, codec.Inputs]:
        if isinstance(body, SpooledBody):  # this thread owns the file until it is decoded
            if not body.claim():
                raise Timeout("the request ended before its image was decoded")
            with body.file:
                return prepare(predictor, body.file, content_type)
        inputs = codec.decode(body, content_type, max_pixels=settings.max_image_pixels,
                              max_instances=settings.max_instances, fetch_s3=fetch_s3,
                              min_side=predictor.resize_size if settings.fast_decode else None,
                              max_request_pixels=settings.max_request_pixels, gate=decode_gate,
                              prepare=predictor.preprocess)
        if inputs.tensor is not None:
            if tuple(inputs.tensor.shape[1:]) != predictor.input_shape:
                raise InvalidTensor(f"expected images of shape {predictor.input_shape}, got {inputs.tensor.shape[1:]}")
            return torch.from_numpy(inputs.tensor), inputs
        return torch.stack(inputs.images), inputs

    def small_enough_for_the_pass(predictor: Predictor, body: bytes | SpooledBody, content_type: str | None) -> bool:
        if not (isinstance(body, bytes) and decode_in_pass(predictor) and codec.is_one_image(content_type)
                and len(body) <= DECODE_IN_PASS_MAX_BYTES):
            return False
        pixels = codec.decoded_pixels(body, max_pixels=settings.max_image_pixels,
                                      min_side=predictor.resize_size if settings.fast_decode else None)
        return pixels is not None and pixels <= DECODE_IN_PASS_MAX_PIXELS

    async def receive(request: Request, *, one_image: bool = False, for_handlers: bool = False) -> bytes | SpooledBody:
        """The body: one image above spool_body_bytes is streamed to disk as it arrives; any other
        body is held in memory (parsed whole, or handed to handlers as bytes), so it may be at most
        max_memory_body_bytes when that is set."""
        limit, note = settings.max_body_bytes, ""
        memory = settings.max_memory_body_bytes
        if not one_image and memory is not None and memory < limit:
            limit = memory
            note = (" for a body handed to the model's handlers (CLASSIFIER_MAX_MEMORY_BODY_MB)" if for_handlers else
                    f" for this content type; only one image may be larger, up to {settings.max_body_bytes} bytes")
        return await read_body(request, limit, settings.body_timeout_s, limit_note=note,
                               spool_above=settings.spool_body_bytes if one_image else None,
                               spool_dir=settings.spool_dir)

    async def serve_request(request: Request, served: Served | LoadedModel) -> Response:
        """A request for ``served``: through its own handlers, or classified by the built-in path."""
        if isinstance(served.predictor, HandlerModel):
            return await through_handlers(request, served)
        return await classify(request, served)

    async def classify(request: Request, served: Served | LoadedModel) -> Response:
        """Decode the request, run it through the model's batcher and encode the answer."""
        predictor = served.predictor
        assert isinstance(predictor, Predictor) and served.batcher is not None
        batcher = served.batcher
        content_type = request.headers.get("content-type")
        options = codec.parse_options(request.headers.get("x-amzn-sagemaker-custom-attributes"),
                                      default_top_k=settings.top_k)
        response_type = codec.choose_response_type(
            request.headers.get("accept"), lines=codec.media_type(content_type) in codec.JSON_LINES_ALIASES)
        body = await receive(request, one_image=codec.is_one_image(content_type))
        loop = asyncio.get_running_loop()

        async def answer() -> Response:
            if small_enough_for_the_pass(predictor, body, content_type):
                inputs = ONE_IMAGE
                logits, timing = await batcher.submit(functools.partial(prepare_image, predictor, body))
                decode_s = timing.prepare_s
            else:
                started = time.perf_counter()
                with batcher.incoming():
                    batch, inputs = await loop.run_in_executor(decode_pool, prepare, predictor, body, content_type)
                decode_s = time.perf_counter() - started
                logits, timing = await batcher.submit(batch)
            payload = codec.encode(logits, predictor.class_names, inputs=inputs, options=options,
                                   response_type=response_type, thresholds=predictor.thresholds)
            metrics.images.inc(len(logits))
            server_timing = (f"decode;dur={decode_s * 1000:.2f}, queue;dur={timing.queue_s * 1000:.2f}, "
                             f"inference;dur={timing.inference_s * 1000:.2f};desc=\"batch of {timing.batch_size}\"")
            return Response(payload, media_type=response_type, headers={"Server-Timing": server_timing})

        try:
            async with asyncio.timeout(settings.request_timeout_s):
                return await answer()
        except TimeoutError:
            raise Timeout(f"the request did not finish within {settings.request_timeout_s:g} s") from None
        finally:
            if isinstance(body, SpooledBody):
                body.release()

    async def through_handlers(request: Request, served: Served | LoadedModel) -> Response:
        """One request through the user's inference.py within the timeout: on the handler threads,
        or, with batched handlers, input_fn and output_fn there (single-threaded) and predict_fn in
        passes shared with other requests."""
        model = served.predictor
        assert isinstance(model, HandlerModel)
        body = await receive(request, for_handlers=True)
        assert isinstance(body, bytes)
        content_type = request.headers.get("content-type") or "application/octet-stream"
        accept = request.headers.get("accept")
        headers = {key.lower(): value for key, value in request.headers.items()}
        batcher = served.batcher

        async def batched() -> Response:
            assert batcher is not None
            context = model.context(headers)
            started = time.perf_counter()
            # input_fn and output_fn on the handler threads, as unbatched: as many at once, 503s beyond
            # the queue, and watched by /ping like any handler call.
            with batcher.incoming():
                rows = await asyncio.shield(handler_load.run(handler_pool, single_threaded, lambda: model.batch_rows(
                    model.prepare(body, content_type, context))))
            input_s = time.perf_counter() - started
            prediction, timing = await batcher.submit(rows)
            started = time.perf_counter()
            payload, answer_type = await asyncio.shield(handler_load.run(
                handler_pool, single_threaded, lambda: model.respond(prediction, accept, context)))
            server_timing = (f"input;dur={input_s * 1000:.2f}, queue;dur={timing.queue_s * 1000:.2f}, "
                             f"inference;dur={timing.inference_s * 1000:.2f};desc=\"batch of {timing.batch_size}\", "
                             f"output;dur={(time.perf_counter() - started) * 1000:.2f}")
            return Response(payload, media_type=answer_type, headers={"Server-Timing": server_timing})

        submitted = time.perf_counter()

        def invoke() -> tuple[bytes, str, float, float]:
            """On a handler thread: the answer, the wait for the thread, and the handlers' time."""
            began = time.perf_counter()
            payload, answer_type = model.invoke(body, content_type, accept, headers)
            return payload, answer_type, began - submitted, time.perf_counter() - began

        try:
            async with asyncio.timeout(settings.request_timeout_s):
                if batcher is not None:
                    return await batched()
                payload, answer_type, queue_s, handler_s = await asyncio.shield(handler_load.run(handler_pool, invoke))
        except TimeoutError:
            raise Timeout(f"the request did not finish within {settings.request_timeout_s:g} s") from None
        return Response(payload, media_type=answer_type, headers={
            "Server-Timing": f"queue;dur={queue_s * 1000:.2f}, handlers;dur={handler_s * 1000:.2f}"})

    def single_model() -> Served:
        if not single:
            predictor = state.predictor
            if predictor is None:
                raise NotReady(f"the model is {state.health.value}", headers={"Retry-After": "5"})
            served = Served(predictor, make_batcher(predictor))
            if served.batcher is not None:
                served.batcher.start()
            single.append(served)
        return single[0]

    def target_model(request: Request) -> LoadedModel:
        assert registry is not None
        name = request.headers.get(TARGET_MODEL_HEADER)
        if not name:
            raise BadRequest(f"this server hosts several models: invoke /models/<name>/invoke or name one "
                             f"in the {TARGET_MODEL_HEADER} header")
        return registry.get(name)

    @app.post("/invocations", summary="Classify images", openapi_extra=REQUEST_BODY_DOC)
    async def invocations(request: Request) -> Response:
        return await serve_request(request, target_model(request) if settings.multi_model else single_model())

    if registry is not None:
        app.include_router(models_router(registry, serve_request, body_timeout_s=settings.body_timeout_s,
                                         openapi_extra=REQUEST_BODY_DOC))

    return app
