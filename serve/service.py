"""The service behind the routes: models, the threads that run them, and one request's way through.

:class:`Service` owns what the HTTP layer (:mod:`serve.app`) only calls into:

- the models, always in a :class:`~serve.registry.ModelRegistry`: one model loaded at start in
  single-model mode (``/ping`` says 503 while it loads, 200 once it has loaded and served a
  warm-up inference, 503 with the reason for good if loading failed; a failure that may pass,
  such as running out of memory, is tried again first), any number through ``/models`` in
  multi-model mode;
- the thread pools: decoding, forward passes side by side, the one wide thread for passes with
  every core (and warm-ups), and the handler threads for models with their own ``inference.py``;
- each model's batcher and scheduling policy (:mod:`serve.scheduling` decides where a request is
  decoded and how wide its pass runs);
- the request timeout, and the stuck-inference check behind ``/ping``.
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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from serve import codec
from serve.admission import MemoryGate, SpooledBody
from serve.batching import Batcher
from serve.errors import InvalidTensor, ModelNotFound, NotReady, Overloaded, Timeout
from serve.handlers import HandlerModel
from serve.observe import Metrics
from serve.predictor import Predictor, select_device
from serve.registry import LoadedModel, ModelRegistry
from serve.s3 import S3Fetcher
from serve.scheduling import PROBE_BATCH, PassTimes, Policy
from serve.settings import Settings

logger = logging.getLogger(__name__)
ONE_IMAGE = codec.Inputs(single=True)
SINGLE_MODEL = "model"  # the registry's name for the one model of single-model mode
# A load that fails in a way that may pass (memory, I/O) is tried again after each of these delays.
LOAD_RETRY_DELAYS_S = (2.0, 5.0)
# An absolute path in a failure's text; /ping shows only its last part (the full text is logged).
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"]+/)*([^\s/'\"]+)")

Model = Predictor | HandlerModel


class Health(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


def may_pass(exc: BaseException) -> bool:
    """Whether a load failure may go away by itself (memory, I/O, the network), unlike a missing or
    malformed file, which no retry mends."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError, OSError))


def public_reason(exc: BaseException) -> str:
    """A failure as /ping shows it to anyone who asks: without the server's file paths."""
    return ABSOLUTE_PATH.sub(r"\1", f"{type(exc).__name__}: {exc}")


def load_with_retries(load: Callable[[], Model], warm_up: Callable[[Model], None], *,
                      retry_delays_s: tuple[float, ...] = LOAD_RETRY_DELAYS_S) -> Model:
    """The model loaded and warmed up; a failure that may pass is tried again after each delay, and
    the last failure (or one no retry mends) is raised."""
    delays = list(retry_delays_s)
    attempt = 0
    while True:
        attempt += 1
        model: Model | None = None
        try:
            model = load()
            warm_up(model)
            return model
        except Exception as exc:
            if not delays or not may_pass(exc):
                raise
            delay = delays.pop(0)
            logger.warning("model failed to load (attempt %d, %s: %s); trying again in %g s",
                           attempt, type(exc).__name__, exc, delay)
        model = None  # the next attempt must not need room for two copies
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        time.sleep(delay)


class PoolLoad:
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


@dataclass(frozen=True)
class Invocation:
    """One request to a model, as the HTTP layer received its headers; for the built-in path, its
    options and answer type already checked (so a bad header is refused before the body is read)."""

    content_type: str | None = None
    accept: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # every header, names in lower case
    options: codec.Options | None = None  # from X-Amzn-SageMaker-Custom-Attributes (built-in path)
    response_type: str = codec.JSON  # what the built-in path answers with


@dataclass(frozen=True)
class Reply:
    payload: bytes
    media_type: str
    server_timing: str  # the Server-Timing header: where the request's time went


def single_threaded(function: Callable[[], Any]) -> Any:
    """``function()`` with one torch thread (a pool thread's setting may be left from before)."""
    torch.set_num_threads(1)
    return function()


class Service:
    def __init__(self, settings: Settings, *, load_predictor: Callable[[], Model] | None = None,
                 load_model: Callable[[Path], Model] | None = None) -> None:
        """One model from ``load_predictor()``, or in multi-model mode any number from
        ``load_model(folder)`` as ``POST /models`` asks."""
        if settings.multi_model and load_model is None:
            raise ValueError("multi-model mode needs load_model")
        if not settings.multi_model and load_predictor is None:
            raise ValueError("single-model mode needs load_predictor")
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health.LOADING
        self.reason = ""  # why the model failed to load (shown by /ping)
        self._stopped = False
        self._load_predictor = load_predictor
        self._load_model = load_model
        # Passes with every core, and warm-ups, run on one thread, "inference": each thread that
        # runs a multi-threaded op owns an OpenMP team, and with more team threads than cores
        # libgomp stops spinning between parallel regions. Passes side by side (each with its share
        # of the cores) run on "inference-shared"; decoding and loading run torch single-threaded.
        self.decode_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="decode",
                                              initializer=torch.set_num_threads, initargs=(1,))
        self.wide_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.shared_pool = ThreadPoolExecutor(max_workers=settings.inference_threads,
                                              thread_name_prefix="inference-shared")
        # Handler mode: user code runs here, off the event loop, at most handler_threads at a time,
        # each call with its share of the cores. Batched handlers run only input_fn and output_fn
        # here, single-threaded (as decoding is), while predict_fn passes have the cores.
        self.handler_pool = ThreadPoolExecutor(
            max_workers=settings.handler_threads, thread_name_prefix="handler", initializer=torch.set_num_threads,
            initargs=(1 if settings.handler_batching else max(1, settings.threads_per_worker // settings.handler_threads),))
        self.handler_load = PoolLoad(limit=settings.handler_threads + settings.max_queue)
        self.decode_gate = MemoryGate(settings.decode_memory_bytes)
        self.fetch_s3 = S3Fetcher(settings.s3_buckets) if settings.s3_buckets else None
        self.registry = ModelRegistry(
            load=self._load_in_one_thread if load_model is not None else None, make_batcher=self.make_batcher,
            warm_up=self.warm_up, device=select_device(settings.device),
            budget_bytes=settings.model_memory_budget_bytes, reserve_bytes=settings.memory_reserve_bytes,
            evict=settings.evict_models, drain_timeout_s=settings.request_timeout_s, root=settings.models_root,
            program=settings.program)

    # Models and their lifecycle.

    def policy(self, model: Model) -> Policy:
        """How ``model``'s passes are scheduled (see :mod:`serve.scheduling`)."""
        settings = self.settings
        if isinstance(model, HandlerModel):
            # Batched handlers: predict_fn calls on the handler threads, as many at once as unbatched
            # requests would run (CLASSIFIER_HANDLER_THREADS); one alone gets every torch thread.
            return Policy(cores=settings.threads_per_worker, passes=settings.handler_threads,
                          max_batch_size=settings.max_batch_size, max_delay_s=settings.max_batch_delay_ms / 1000)
        cpu = model.device.type == "cpu"
        # A GPU runs one pass at a time anyway, and a batch pays there; on a CPU, passes side by side
        # use the cores best (ONNX Runtime's too: each pass runs on the session for its thread
        # count), and a batch only up to the work one pass should gather (its image timed at warm-up).
        return Policy(cores=settings.threads_per_worker, passes=settings.inference_threads if cpu else 1,
                      max_batch_size=settings.max_batch_size, max_delay_s=settings.max_batch_delay_ms / 1000,
                      decode_in_pass=cpu, times=model.pass_times if cpu else None)

    def make_batcher(self, model: Model, name: str) -> Batcher | None:
        """The batcher that feeds ``model``'s passes (None: a model whose own handlers serve each
        request in one call)."""
        options = {"closed_error": lambda: ModelNotFound(f"model {name!r} is not loaded")} if self.settings.multi_model else {}
        if isinstance(model, HandlerModel):
            if not model.batching:
                return None

            def predict(rows: Any, threads: int | None) -> Any:
                if threads is not None:
                    torch.set_num_threads(threads)
                return model.predict_batch(rows)

            return Batcher(predict, self.handler_pool, policy=self.policy(model),
                           wide_executor=self.wide_pool, max_queue=self.settings.max_queue, isolate_failures=True,
                           on_batch=self.metrics.batch_size.observe, **options)
        return Batcher(model.infer, self.shared_pool, policy=self.policy(model), wide_executor=self.wide_pool,
                       max_queue=self.settings.max_queue, on_batch=self.metrics.batch_size.observe, **options)

    def warm_up(self, model: Model) -> None:
        """One pass where lone requests will run: on the wide thread with every core. On a CPU, then
        passes timed with a narrow pass's threads, by which the policy bounds batches, on a thread
        of their own (so no pass of a model already serving waits for them, and no OpenMP team
        outlives them; with other models busy the times come out longer). Narrow passes serve
        requests under load: a model that fails one does not load. A model served through its own
        handlers is ready once its model_fn has returned."""
        if isinstance(model, HandlerModel):
            return
        self.wide_pool.submit(model.warm_up, self.settings.threads_per_worker).result()
        if model.device.type != "cpu":
            return
        threads = self.policy(model).narrow_threads
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="timing") as timing:
            one_s = timing.submit(model.time_pass, threads).result()
            try:
                batched_s: float | None = timing.submit(model.time_pass, threads, PROBE_BATCH).result()
            except Exception as exc:
                if may_pass(exc):  # short of memory for now: the load is tried again, not judged by it
                    raise
                logger.warning("a pass of %d images failed (%s: %s): passes will not batch requests",
                               PROBE_BATCH, type(exc).__name__, exc)
                batched_s = None
        model.pass_times = PassTimes(one_s, batched_s)
        batch = "failed" if batched_s is None else f"{batched_s * 1000:.1f} ms an image"
        logger.info("a pass with %s takes %.1f ms for one image, and for %d: %s; a pass takes at most %d image(s)",
                    f"{threads} thread(s)" if threads else "the default threads", one_s * 1000, PROBE_BATCH, batch,
                    self.policy(model).useful_batch)

    def _load_in_one_thread(self, model_dir: Path) -> Model:
        assert self._load_model is not None
        torch.set_num_threads(1)
        return self._load_model(model_dir)

    def _load_single(self) -> Model | None:
        """On a loader thread: the one model, loaded and warmed up; None (and FAILED) if it failed."""
        assert self._load_predictor is not None
        torch.set_num_threads(1)
        try:
            return load_with_retries(self._load_predictor, self.warm_up)
        except Exception as exc:  # noqa: BLE001 - any failure is the model's state, shown by /ping
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        logger.error("model failed to load", exc_info=exc)
        self.reason = public_reason(exc)
        self.health = Health.FAILED
        if self.settings.failed_exit_s > 0 and self.settings.workers == 1:
            # SIGTERM stops the server the way the platform would; __main__ then exits with status 1.
            logger.error("the server exits in %g s: the model failed to load", self.settings.failed_exit_s)
            exit_timer = threading.Timer(self.settings.failed_exit_s, signal.raise_signal, (signal.SIGTERM,))
            exit_timer.daemon = True
            exit_timer.start()

    def _serve_single(self, model: Model) -> None:
        """On the event loop: the loaded model joins the registry, and the server is ready (unless
        it is stopping by now)."""
        if self._stopped:
            return
        try:
            self.registry.add(SINGLE_MODEL, str(self.settings.model_dir), model)
        except Exception as exc:  # noqa: BLE001 - the model cannot be served: shown by /ping
            self._failed(exc)
            return
        self.health = Health.READY
        logger.info("model ready")

    async def start(self) -> None:
        if self.settings.multi_model:
            self.health = Health.READY
            return
        if self.settings.workers > 1:
            # Worker processes share one listening socket: a worker that takes connections only
            # once its model is ready never answers 503 while a sibling says /ping 200. One whose
            # model failed to load fails its startup, which stops the server (see __main__).
            model = await asyncio.to_thread(self._load_single)
            if model is None:
                if self.settings.failed_exit_s > 0:
                    raise RuntimeError(f"the model failed to load: {self.reason}")
                return
            self._serve_single(model)
            return
        # One process: take connections at once and let /ping report the loading. A thread of its
        # own (not the loop's executor), so a server stopped while loading need not wait for it.
        loop = asyncio.get_running_loop()

        def load() -> None:
            model = self._load_single()
            if model is not None:
                try:
                    loop.call_soon_threadsafe(self._serve_single, model)
                except RuntimeError:  # the server stopped while the model loaded
                    pass

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    async def stop(self) -> None:
        self._stopped = True
        await self.registry.close()
        for pool in (self.decode_pool, self.wide_pool, self.shared_pool, self.handler_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def model(self, name: str | None = None) -> LoadedModel:
        """The model a request is for: ``name`` in multi-model mode, else the one model (503 until
        it is ready)."""
        if self._stopped:
            raise NotReady("the server is stopping", headers={"Retry-After": "5"})
        if name is None:
            if self.health is not Health.READY:
                raise NotReady(f"the model is {self.health.value}", headers={"Retry-After": "5"})
            return self.registry.get(SINGLE_MODEL)
        return self.registry.get(name)

    def longest_inference_s(self) -> float:
        """How long the oldest inference running now has been at it, whichever model it is for."""
        return max([self.handler_load.longest_s(), *(batcher.longest_pass_s() for batcher in self.registry.batchers())])

    # One request.

    def invocation(self, model: LoadedModel, *, content_type: str | None, accept: str | None,
                   custom_attributes: str | None, headers: Mapping[str, str]) -> Invocation:
        """A request's headers, checked before its body is read: for the built-in path, its options
        (``X-Amzn-SageMaker-Custom-Attributes``) and an answer type the client accepts."""
        if isinstance(model.predictor, HandlerModel):
            return Invocation(content_type, accept, headers)
        options = codec.parse_options(custom_attributes, default_top_k=self.settings.top_k)
        response_type = codec.choose_response_type(
            accept, lines=codec.media_type(content_type) in codec.JSON_LINES_ALIASES)
        return Invocation(content_type, accept, headers, options, response_type)

    async def invoke(self, model: LoadedModel, invocation: Invocation, body: bytes | SpooledBody) -> Reply:
        """The answer of ``model`` to ``body`` within the request timeout: through its own handlers,
        or classified by the built-in path."""
        timeout_s = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                if isinstance(model.predictor, HandlerModel):
                    assert isinstance(body, bytes)
                    return await self._through_handlers(model, invocation, body)
                return await self._classify(model, invocation, body)
        except TimeoutError:
            raise Timeout(f"the request did not finish within {timeout_s:g} s") from None
        finally:
            if isinstance(body, SpooledBody):
                body.release()

    def _prepare_image(self, predictor: Predictor, body: bytes) -> torch.Tensor:
        """On the pass's thread: decoded and preprocessed single-threaded, as on the decode pool (the
        pass's own threads are the engine's; an OpenMP team left spinning would take their cores)."""
        torch.set_num_threads(1)
        image = codec.decode_image(body, max_pixels=self.settings.max_image_pixels,
                                   min_side=predictor.resize_size if self.settings.fast_decode else None)
        return predictor.preprocess(image)[None]

    def _prepare(self, predictor: Predictor, body: bytes | BinaryIO | SpooledBody,
                 content_type: str | None) -> tuple[torch.Tensor, codec.Inputs]:
        settings = self.settings
        if isinstance(body, SpooledBody):  # this thread owns the file until it is decoded
            if not body.claim():
                raise Timeout("the request ended before its image was decoded")
            with body.file:
                return self._prepare(predictor, body.file, content_type)
        inputs = codec.decode(body, content_type, max_pixels=settings.max_image_pixels,
                              max_instances=settings.max_instances, fetch_s3=self.fetch_s3,
                              min_side=predictor.resize_size if settings.fast_decode else None,
                              max_request_pixels=settings.max_request_pixels, gate=self.decode_gate,
                              prepare=predictor.preprocess)
        if inputs.tensor is not None:
            if tuple(inputs.tensor.shape[1:]) != predictor.input_shape:
                raise InvalidTensor(f"expected images of shape {predictor.input_shape}, got {inputs.tensor.shape[1:]}")
            return torch.from_numpy(inputs.tensor), inputs
        return torch.stack(inputs.images), inputs

    def _decodes_in_pass(self, batcher: Batcher, predictor: Predictor, content_type: str | None,
                         body: bytes | SpooledBody) -> bool:
        if not isinstance(body, bytes) or not codec.is_one_image(content_type):
            return False
        # Counting the pixels reads the image's header on the event loop: microseconds for a body this small.
        return batcher.policy.decodes_in_pass(len(body), lambda: codec.decoded_pixels(
            body, max_pixels=self.settings.max_image_pixels,
            min_side=predictor.resize_size if self.settings.fast_decode else None))

    async def _classify(self, model: LoadedModel, invocation: Invocation, body: bytes | SpooledBody) -> Reply:
        """Decode the request (inside its pass or beforehand, as the policy says), run it through
        the model's batcher and encode the answer."""
        predictor, batcher = model.predictor, model.batcher
        assert isinstance(predictor, Predictor) and batcher is not None and invocation.options is not None
        if self._decodes_in_pass(batcher, predictor, invocation.content_type, body):
            assert isinstance(body, bytes)
            inputs = ONE_IMAGE
            logits, timing = await batcher.submit(functools.partial(self._prepare_image, predictor, body))
            decode_s = timing.prepare_s
        else:
            started = time.perf_counter()
            with batcher.incoming():
                batch, inputs = await asyncio.get_running_loop().run_in_executor(
                    self.decode_pool, self._prepare, predictor, body, invocation.content_type)
            decode_s = time.perf_counter() - started
            logits, timing = await batcher.submit(batch)
        payload = codec.encode(logits, predictor.class_names, inputs=inputs, options=invocation.options,
                               response_type=invocation.response_type, thresholds=predictor.thresholds)
        self.metrics.images.inc(len(logits))
        return Reply(payload, invocation.response_type,
                     f"decode;dur={decode_s * 1000:.2f}, queue;dur={timing.queue_s * 1000:.2f}, "
                     f"inference;dur={timing.inference_s * 1000:.2f};desc=\"batch of {timing.batch_size}\"")

    async def _through_handlers(self, model: LoadedModel, invocation: Invocation, body: bytes) -> Reply:
        """One request through the user's inference.py: on the handler threads, or, with batched
        handlers, input_fn and output_fn there (single-threaded) and predict_fn in passes shared
        with other requests."""
        handlers = model.predictor
        assert isinstance(handlers, HandlerModel)
        content_type = invocation.content_type or "application/octet-stream"
        if model.batcher is not None:
            return await self._batched_handlers(handlers, model.batcher, body, content_type, invocation)
        submitted = time.perf_counter()

        def invoke() -> tuple[bytes, str, float, float]:
            """On a handler thread: the answer, the wait for the thread, and the handlers' time."""
            began = time.perf_counter()
            payload, answer_type = handlers.invoke(body, content_type, invocation.accept, dict(invocation.headers))
            return payload, answer_type, began - submitted, time.perf_counter() - began

        payload, answer_type, queue_s, handler_s = await asyncio.shield(
            self.handler_load.run(self.handler_pool, invoke))
        return Reply(payload, answer_type, f"queue;dur={queue_s * 1000:.2f}, handlers;dur={handler_s * 1000:.2f}")

    async def _batched_handlers(self, handlers: HandlerModel, batcher: Batcher, body: bytes, content_type: str,
                                invocation: Invocation) -> Reply:
        context = handlers.context(dict(invocation.headers))
        started = time.perf_counter()
        # input_fn and output_fn on the handler threads, as unbatched: as many at once, 503s beyond
        # the queue, and watched by /ping like any handler call.
        with batcher.incoming():
            rows = await asyncio.shield(self.handler_load.run(self.handler_pool, single_threaded, lambda: handlers.batch_rows(
                handlers.prepare(body, content_type, context))))
        input_s = time.perf_counter() - started
        prediction, timing = await batcher.submit(rows)
        started = time.perf_counter()
        payload, answer_type = await asyncio.shield(self.handler_load.run(
            self.handler_pool, single_threaded, lambda: handlers.respond(prediction, invocation.accept, context)))
        return Reply(payload, answer_type,
                     f"input;dur={input_s * 1000:.2f}, queue;dur={timing.queue_s * 1000:.2f}, "
                     f"inference;dur={timing.inference_s * 1000:.2f};desc=\"batch of {timing.batch_size}\", "
                     f"output;dur={(time.perf_counter() - started) * 1000:.2f}")
