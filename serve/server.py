"""The server behind ``python -m serve`` (see :mod:`serve.__main__`, which binds its socket first).

With ``SAGEMAKER_MODEL_SERVER_WORKERS`` > 1, uvicorn runs that many worker processes, each
loading the model and building the app through :func:`create`; they share their metrics through a
private folder under the temporary folder (``TMPDIR``), so ``/metrics`` reports every worker,
whichever one answers. The exit status is 0 when the server was stopped (SIGTERM, SIGINT) and 1
when the model failed to load (see ``CLASSIFIER_FAILED_EXIT_S``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from classifier.logs import setup_logging
from serve import connections, user_code
from serve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("serve")

# SageMaker sends SIGKILL 30 s after SIGTERM: leave time for in-flight requests, then exit.
GRACEFUL_SHUTDOWN_S = 25
# Where prometheus_client keeps each process's metrics when several processes share them; read
# once, when it is imported. The server sets it for its own workers only.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def load_predictor(settings: Settings, startup_error: str | None = None):
    """The model: through its own inference.py when it has one (handler mode), else an artifact."""
    from serve.handlers import HandlerModel
    from serve.predictor import Predictor

    if startup_error:
        raise RuntimeError(startup_error)
    if user_code.has_handlers(settings.model_dir, settings.program, settings.submit_directory):
        return HandlerModel.load(settings.model_dir, program=settings.program,
                                 submit_directory=settings.submit_directory, default_accept=settings.default_accept,
                                 batching=settings.handler_batching,
                                 install=False)  # main() installed the requirements before any import
    return Predictor.load(settings.model_dir, allow_default=settings.default_model, device=settings.device,
                          half=settings.half, jit=settings.jit, threads=settings.pass_threads(),
                          engine=settings.runtime, graph_cache=settings.graph_cache)


def install_requirements(settings: Settings) -> str | None:
    """Install the model code's requirements.txt once, before the server imports torch or numpy (a
    pin of either then takes effect); the reason it failed, or None."""
    if settings.multi_model or not user_code.has_handlers(settings.model_dir, settings.program,
                                                          settings.submit_directory):
        return None
    try:
        user_code.install_requirements(user_code.code_folder(settings.model_dir, settings.program,
                                                             settings.submit_directory))
    except RuntimeError as exc:
        logger.error("%s", exc)
        return str(exc)
    return None


def load_model(settings: Settings, model_dir: Path):
    """A model named by ``POST /models`` (multi-model mode): through its own ``code/inference.py``
    when it has one (its requirements installed first; its modules private to it), else an
    artifact; never the default model."""
    from serve.handlers import HandlerModel
    from serve.predictor import Predictor

    if user_code.has_own_code(model_dir, settings.program):
        return HandlerModel.load(model_dir, program=settings.program, default_accept=settings.default_accept,
                                 batching=settings.handler_batching, private=True)
    return Predictor.load(model_dir, allow_default=False, device=settings.device, half=settings.half,
                          jit=settings.jit, threads=settings.pass_threads(), engine=settings.runtime,
                          graph_cache=settings.graph_cache)


def build(settings: Settings, startup_error: str | None = None) -> FastAPI:
    with collector_paused():
        from serve.app import create_app

    if settings.multi_model:
        return create_app(settings, load_model=functools.partial(load_model, settings))
    return create_app(settings, functools.partial(load_predictor, settings, startup_error))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Import the server's modules (PyTorch, torchvision, FastAPI: a few hundred thousand objects)
    with Python's cyclic garbage collector off, then freeze what they made.

    With the collector on, the growing heap sets off full collections during the imports, each
    walking every object made so far, for little garbage (bench/results/cold_start-notes.md has
    the cost). Frozen objects are never walked again; the collector then runs as usual over what
    the server makes from here on. The price: the few reference cycles the imports left as garbage
    are frozen with the rest and kept for the life of the process."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def create() -> FastAPI:
    """App factory for uvicorn's worker processes (settings from this process's environment)."""
    settings = Settings.from_env(os.environ)
    setup_logging(settings.log_level, json_format=settings.log_json)
    connections.configure(connection_limits(settings))
    return build(settings)


def default_region(settings: Settings, environ: MutableMapping[str, str]) -> None:
    """The region SageMaker names (``SAGEMAKER_REGION``) as boto3's default, for the server and the
    user's code, unless a region is set already: a handler that makes a boto3 client without one
    (SDK v3's generated inference code does) works as on SageMaker's own containers."""
    if settings.region and not (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")):
        environ["AWS_DEFAULT_REGION"] = settings.region
        logger.info("AWS_DEFAULT_REGION=%s (from SAGEMAKER_REGION)", settings.region)


def connection_limits(settings: Settings) -> connections.ConnectionLimits:
    return connections.ConnectionLimits(head_timeout_s=settings.header_timeout_s,
                                        max_connections=settings.max_connections)


def run_workers(config: uvicorn.Config, sock: socket.socket) -> int:
    """uvicorn's worker processes, as ``uvicorn.run`` starts them, keeping their exit statuses: a
    worker whose model failed to load fails its startup, which stops the others; then 1."""
    supervisor = Multiprocess(config, sockets=[sock])
    supervisor.run()
    return 1 if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes) else 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run(settings: Settings, sock: socket.socket) -> int:
    """Serve on ``sock`` (bound and listening) until stopped; the exit status."""
    setup_logging(settings.log_level, json_format=settings.log_json)
    default_region(settings, os.environ)
    startup_error = install_requirements(settings)  # a failure keeps /ping 503 with the reason
    # uvicorn drains on SIGTERM, restores this handler, then re-raises the signal: a stop asked
    # for by the platform ends with exit code 0 instead of "killed by SIGTERM".
    signal.signal(signal.SIGTERM, _exit_cleanly)
    options = {"log_config": None, "access_log": False,
               "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
               "http": connections.configure(connection_limits(settings))}
    if settings.workers > 1:
        # A fresh folder, private to this server and removed when it exits; the temporary folder is
        # writable even on a read-only root filesystem. The workers inherit the variable.
        with tempfile.TemporaryDirectory(prefix="serve-metrics-", ignore_cleanup_errors=True) as metrics_dir:
            os.environ[MULTIPROC_DIR_ENV] = metrics_dir
            config = uvicorn.Config("serve.server:create", factory=True, workers=settings.workers, **options)
            return run_workers(config, sock)
    os.environ.pop(MULTIPROC_DIR_ENV, None)  # one process keeps its metrics in the app: nothing to share
    app = build(settings, startup_error)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # from _exit_cleanly, once uvicorn has drained
        if exc.code not in (0, None):
            raise
    if not server.started:  # as uvicorn.run: the app's startup failed
        return STARTUP_FAILURE
    from serve.service import Health

    return 1 if app.state.service.health is Health.FAILED else 0
