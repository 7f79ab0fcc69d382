"""Server settings, read once from an environment mapping (``Settings.from_env(os.environ)``).

SageMaker's own variables are honoured where they exist (``SAGEMAKER_BIND_TO_PORT``,
``SAGEMAKER_MODEL_SERVER_WORKERS``, ``SAGEMAKER_MODEL_SERVER_TIMEOUT``, ``SAGEMAKER_BATCH``,
``SAGEMAKER_PROGRAM``, ``SAGEMAKER_SUBMIT_DIRECTORY``, ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT``,
``SAGEMAKER_MAX_PAYLOAD_IN_MB``, ``SAGEMAKER_BATCH_STRATEGY``,
``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS``, and ``SAGEMAKER_MULTI_MODEL`` as AWS's toolkits read it);
everything else is ``CLASSIFIER_*``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from classifier.parsing import parse_bool
from serve.scheduling import Policy

T = TypeVar("T")
DEFAULT_PORT = 8080
MEGABYTE = 1024 * 1024
# SageMaker gives up on a real-time invocation after 60 s and on a Batch Transform one after
# 600 s; answering 504 a little earlier tells the client what happened.
REALTIME_TIMEOUT_S = 55.0
BATCH_TIMEOUT_S = 590.0
# An asynchronous endpoint's requests may run for up to an hour and carry up to 1 GB (from S3).
ASYNC_TIMEOUT_S = 3600.0
ASYNC_MAX_BODY_MB = 1024.0
ASYNC_BODY_TIMEOUT_S = 300.0
ASYNC_MAX_MEMORY_BODY_MB = 8.0  # JSON, .npy and handler bodies behind an asynchronous endpoint
# A server started from the environment whose model failed to load exits after this long.
FAILED_EXIT_S = 60.0
RUNTIMES = ("auto", "onnxruntime", "torch")  # CLASSIFIER_RUNTIME's values (see serve.runtime)


class ConfigError(ValueError):
    """An environment variable has a value the server cannot use."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _megabytes(value: float | None) -> int | None:
    return None if value is None else int(value * MEGABYTE)


def _buckets(text: str) -> frozenset[str]:
    return frozenset(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    model_dir: Path = Path("/opt/ml/model")
    # With no artifact in model_dir, serve the ImageNet EfficientNet-Lite0 shipped in the image.
    default_model: bool = True
    workers: int = 1
    threads_per_worker: int = 1  # torch threads a lone forward pass may use
    inference_threads: int = 1  # forward passes at once per worker on a CPU (each its own thread)
    top_k: int = 5
    max_body_bytes: int = 6 * MEGABYTE
    # One image above this is streamed into a temporary file in spool_dir as it arrives, never held
    # in memory. Other bodies are parsed whole (or handed to handlers as bytes): they may be at most
    # max_memory_body_bytes (None: the body limit).
    spool_body_bytes: int = 8 * MEGABYTE
    max_memory_body_bytes: int | None = None
    spool_dir: Path | None = None  # None: the temporary folder (TMPDIR)
    max_image_pixels: int = 40_000_000
    # Decoded pixels of one request's images together (headers are read before any is decoded).
    max_request_pixels: int = 160_000_000
    # Full-size decoded images held at once across all requests (see serve.admission).
    decode_memory_bytes: int = 512 * MEGABYTE
    fast_decode: bool = True  # decode large JPEGs at a reduced scale (never below the model's resize size)
    max_batch_size: int = 16  # images per forward pass
    max_batch_delay_ms: float = 0.0  # extra wait for more requests; 0 = batch what is queued
    max_instances: int = 64  # images in one request
    max_queue: int = 256  # images waiting for the model before requests get 503
    request_timeout_s: float = REALTIME_TIMEOUT_S
    # Connections and requests (see serve.connections and serve.admission.RequestLimit).
    header_timeout_s: float = 10.0  # a connection's request head must arrive within this
    body_timeout_s: float = 30.0  # a request's body must arrive within this after its head (else 408)
    max_connections: int = 1000  # open connections; beyond, new ones get 503 and are closed
    max_concurrent_requests: int = 64  # POST requests in progress (each may hold a body); beyond, 503
    # After a failed load, /ping answers 503 with the reason for this long, then the server exits
    # with status 1 so that whatever runs it restarts it or reports it (with several workers, at
    # once); 0 keeps it up for good. `serve` reads FAILED_EXIT_S from the environment; an app built
    # in code (tests, embedding) keeps 0 and never signals its own process.
    failed_exit_s: float = 0.0
    device: str = "auto"
    half: bool | None = None  # None: half precision on CUDA, float32 on CPU
    jit: bool | None = None  # trace and freeze the network with TorchScript; None: on a CPU only
    runtime: str = "auto"  # CLASSIFIER_RUNTIME, one of RUNTIMES: the engine of the forward passes (serve.runtime)
    graph_cache: Path | None = None  # CLASSIFIER_GRAPH_CACHE: where exported graphs are kept; None: nowhere
    batch_transform: bool = False
    asynchronous: bool = False  # CLASSIFIER_ASYNC: behind an asynchronous endpoint (larger, slower requests)
    batch_strategy: str = "MULTI_RECORD"
    max_concurrent_transforms: int = 1
    s3_buckets: frozenset[str] = field(default_factory=frozenset)
    demo: bool = True  # GET / serves a small page to try the model in a browser
    access_log: bool = True  # one log line per request other than /ping
    # Multi-model mode: models are loaded by name through POST /models (SageMaker's MME API).
    multi_model: bool = False
    models_root: Path = Path("/opt/ml/models")  # POST /models loads only from folders under this one
    model_memory_budget_bytes: int | None = None  # for all loaded models together; None: free memory decides
    memory_reserve_bytes: int = 256 * MEGABYTE  # left free for requests when loading a model
    evict_models: bool = True  # unload least recently used models to make room (else 507); off under SageMaker MME
    # Handler mode (the model's code/inference.py, as SageMaker's PyTorch container serves it).
    program: str | None = None  # SAGEMAKER_PROGRAM: the handler module; set by PyTorchModel(entry_point=...)
    submit_directory: str | None = None  # SAGEMAKER_SUBMIT_DIRECTORY: where it is, when not in <model>/code
    default_accept: str = "application/json"  # SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT
    region: str | None = None  # SAGEMAKER_REGION: the AWS region for user code that sets none (boto3)
    handler_threads: int = 1  # requests through the handlers at once (each with cores / handler_threads torch threads)
    handler_batching: bool = False  # requests share predict_fn calls (input_fn returns rows; see serve.handlers)
    log_level: str = "INFO"
    log_json: bool = False

    def pass_threads(self) -> tuple[int, ...]:
        """The thread counts a forward pass on a CPU may get (see serve.scheduling)."""
        return Policy(cores=self.threads_per_worker, passes=self.inference_threads).widths()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        def get(key: str, parse: Callable[[str], T], default: T) -> T:
            raw = environ.get(key)
            if raw is None or raw.strip() == "":
                return default
            try:
                return parse(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"environment variable {key}={raw!r} is invalid: {exc}") from None

        base_dir = Path(environ.get("SAGEMAKER_BASE_DIR") or "/opt/ml")
        cores = os.cpu_count() or 1
        on_sagemaker_mme = get("SAGEMAKER_MULTI_MODEL", parse_bool, False)
        multi_model = get("CLASSIFIER_MULTI_MODEL", parse_bool, on_sagemaker_mme)
        # Models loaded through POST /models live in one process: worker processes would each
        # hold a different set, so multi-model mode always runs one.
        workers = 1 if multi_model else get("SAGEMAKER_MODEL_SERVER_WORKERS", _positive_int, 1)
        batch = get("SAGEMAKER_BATCH", parse_bool, False)
        asynchronous = get("CLASSIFIER_ASYNC", parse_bool, cls.asynchronous)
        payload_mb = get("SAGEMAKER_MAX_PAYLOAD_IN_MB", _positive_float, ASYNC_MAX_BODY_MB if asynchronous else 6.0)
        timeout = get("SAGEMAKER_MODEL_SERVER_TIMEOUT", _positive_float,
                      ASYNC_TIMEOUT_S if asynchronous else BATCH_TIMEOUT_S if batch else REALTIME_TIMEOUT_S)
        strategy = get("SAGEMAKER_BATCH_STRATEGY", str.upper, cls.batch_strategy)
        if strategy not in ("SINGLE_RECORD", "MULTI_RECORD"):
            raise ConfigError(f"environment variable SAGEMAKER_BATCH_STRATEGY={strategy!r} is invalid: "
                              "expected SINGLE_RECORD or MULTI_RECORD")
        spool_dir = Path(environ["CLASSIFIER_SPOOL_DIR"]) if environ.get("CLASSIFIER_SPOOL_DIR") else None
        if spool_dir is not None and not (spool_dir.is_dir() and os.access(spool_dir, os.W_OK | os.X_OK)):
            raise ConfigError(f"environment variable CLASSIFIER_SPOOL_DIR={str(spool_dir)!r} is not a folder "
                              "this server can write to")
        half = environ.get("CLASSIFIER_HALF", "auto").strip().lower()
        jit = environ.get("CLASSIFIER_JIT", "auto").strip().lower()
        runtime = (environ.get("CLASSIFIER_RUNTIME") or cls.runtime).strip().lower()
        if runtime not in RUNTIMES:
            raise ConfigError(f"environment variable CLASSIFIER_RUNTIME={runtime!r} is invalid: expected one of "
                              f"{', '.join(RUNTIMES)}")
        # Outside the image, one folder per user: another user's folder is neither trusted nor written.
        graph_cache = Path(environ.get("CLASSIFIER_GRAPH_CACHE")
                           or Path(tempfile.gettempdir()) / f"classifier-graphs-{os.getuid()}")
        return cls(
            host=environ.get("CLASSIFIER_HOST") or cls.host,
            port=get("SAGEMAKER_BIND_TO_PORT", _positive_int, DEFAULT_PORT),
            model_dir=Path(environ.get("SM_MODEL_DIR") or base_dir / "model"),
            default_model=get("CLASSIFIER_DEFAULT_MODEL", parse_bool, cls.default_model),
            workers=workers,
            # Workers times a lone pass's threads should not exceed the cores, or they fight over them.
            threads_per_worker=get("CLASSIFIER_THREADS_PER_WORKER", _positive_int, max(1, cores // workers)),
            # One pass per core: independent passes scale better than threads inside one pass. Per
            # worker, not per worker's share: worker processes take connections unevenly (one may
            # accept them all), and a worker that holds most of them still uses every core. Narrow
            # passes are single-threaded, so busy workers side by side share the cores (and their
            # passes' working memory adds up: the README says so).
            inference_threads=get("CLASSIFIER_INFERENCE_THREADS", _positive_int, cores),
            top_k=get("CLASSIFIER_TOP_K", _positive_int, cls.top_k),
            max_body_bytes=int(get("CLASSIFIER_MAX_BODY_MB", _positive_float, payload_mb) * MEGABYTE),
            spool_body_bytes=int(get("CLASSIFIER_SPOOL_BODY_MB", _positive_float, 8.0) * MEGABYTE),
            # Behind an asynchronous endpoint bodies may be 1 GB: only an image may be that large.
            max_memory_body_bytes=_megabytes(get("CLASSIFIER_MAX_MEMORY_BODY_MB", _positive_float,
                                                 ASYNC_MAX_MEMORY_BODY_MB if asynchronous else None)),
            spool_dir=spool_dir,
            max_image_pixels=get("CLASSIFIER_MAX_IMAGE_PIXELS", _positive_int, cls.max_image_pixels),
            max_request_pixels=get("CLASSIFIER_MAX_REQUEST_PIXELS", _positive_int, cls.max_request_pixels),
            decode_memory_bytes=int(get("CLASSIFIER_DECODE_MEMORY_MB", _positive_float, 512.0) * MEGABYTE),
            fast_decode=get("CLASSIFIER_FAST_DECODE", parse_bool, cls.fast_decode),
            max_batch_size=get("CLASSIFIER_MAX_BATCH_SIZE", _positive_int, cls.max_batch_size),
            max_batch_delay_ms=get("CLASSIFIER_MAX_BATCH_DELAY_MS", _non_negative_float, cls.max_batch_delay_ms),
            max_instances=get("CLASSIFIER_MAX_INSTANCES", _positive_int, cls.max_instances),
            max_queue=get("CLASSIFIER_MAX_QUEUE", _positive_int, cls.max_queue),
            request_timeout_s=timeout,
            header_timeout_s=get("CLASSIFIER_HEADER_TIMEOUT_S", _positive_float, cls.header_timeout_s),
            body_timeout_s=get("CLASSIFIER_BODY_TIMEOUT_S", _positive_float,
                               ASYNC_BODY_TIMEOUT_S if asynchronous else cls.body_timeout_s),
            max_connections=get("CLASSIFIER_MAX_CONNECTIONS", _positive_int, cls.max_connections),
            max_concurrent_requests=get("CLASSIFIER_MAX_CONCURRENT_REQUESTS", _positive_int,
                                        cls.max_concurrent_requests),
            failed_exit_s=get("CLASSIFIER_FAILED_EXIT_S", _non_negative_float, FAILED_EXIT_S),
            device=environ.get("CLASSIFIER_DEVICE") or cls.device,
            half=None if half == "auto" else get("CLASSIFIER_HALF", parse_bool, False),
            jit=None if jit == "auto" else get("CLASSIFIER_JIT", parse_bool, False),
            runtime=runtime,
            graph_cache=graph_cache,
            batch_transform=batch,
            asynchronous=asynchronous,
            batch_strategy=strategy,
            max_concurrent_transforms=get("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", _positive_int, workers),
            s3_buckets=get("CLASSIFIER_S3_BUCKETS", _buckets, frozenset()),
            demo=get("CLASSIFIER_DEMO", parse_bool, cls.demo),
            access_log=get("CLASSIFIER_ACCESS_LOG", parse_bool, cls.access_log),
            multi_model=multi_model,
            models_root=Path(environ.get("CLASSIFIER_MODELS_ROOT") or base_dir / "models"),
            model_memory_budget_bytes=_megabytes(get("CLASSIFIER_MODEL_MEMORY_MB", _positive_float, None)),
            memory_reserve_bytes=int(get("CLASSIFIER_MEMORY_RESERVE_MB", _non_negative_float, 256.0) * MEGABYTE),
            # SageMaker keeps its own list of loaded models and unloads some when a load answers
            # 507; a model dropped behind its back would answer 404. Elsewhere, evict (LRU).
            evict_models=get("CLASSIFIER_EVICT_MODELS", parse_bool, not on_sagemaker_mme),
            program=environ.get("SAGEMAKER_PROGRAM") or None,
            submit_directory=environ.get("SAGEMAKER_SUBMIT_DIRECTORY") or None,
            default_accept=environ.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT") or cls.default_accept,
            region=environ.get("SAGEMAKER_REGION") or None,
            handler_threads=get("CLASSIFIER_HANDLER_THREADS", _positive_int, cls.handler_threads),
            handler_batching=get("CLASSIFIER_HANDLER_BATCHING", parse_bool, cls.handler_batching),
            log_level=(environ.get("LOG_LEVEL") or cls.log_level).upper(),
            log_json=get("LOG_FORMAT", lambda v: v.lower() == "json", cls.log_json),
        )
