"""The servers under test: our container, and TorchServe serving the same networks.

TorchServe lives in its own virtual environment (``bench/.venv-torchserve``, git-ignored), made on
first use with the project's torch and torchvision; it never touches the project's ``.venv``.
Every TorchServe instance gets its own folder (config, logs, TMPDIR: TorchServe keeps its pid file
in the temp folder and refuses a second instance otherwise), listens on 127.0.0.1 only, and runs in
its own process group, which is what :meth:`TorchServe.stop` ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.host import free_port, wait_for_ping  # noqa: F401 - free_port is re-exported: one definition

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TORCHSERVE_VENV = BENCH / ".venv-torchserve"
TORCHSERVE_FILES = BENCH / "torchserve"
TORCHSERVE_PACKAGES = ("torchserve", "torch-model-archiver", "pyyaml", "captum", "timm", "onnxruntime", "psutil")
# How TorchServe runs a network, by the file in its archive (the stock loader chooses by its
# suffix): the eager module and its weights, the network traced and frozen with TorchScript, or
# its ONNX graph in ONNX Runtime.
SERIALIZED_SUFFIX = {"eager": ".pt", "torchscript": ".pt", "onnxruntime": ".onnx"}
ENGINES = tuple(SERIALIZED_SUFFIX)


def torchserve_venv() -> Path:
    """The TorchServe environment's python, created (a few minutes, ~6 GB) if it is not there yet."""
    python = TORCHSERVE_VENV / "bin" / "python"
    check = [str(python), "-c", "import ts, model_archiver, captum, timm, torch, torchvision, onnxruntime, psutil"]
    if python.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return python
    import torch
    import torchvision

    versions = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
    print(f"serve_load: creating {TORCHSERVE_VENV} ({', '.join(versions + list(TORCHSERVE_PACKAGES))})", flush=True)
    # venv builds on the base interpreter even when run from inside the project's .venv.
    subprocess.run([sys.executable, "-m", "venv", str(TORCHSERVE_VENV)], check=True)
    subprocess.run([str(TORCHSERVE_VENV / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "requirements" / "constraints.txt"),
                    *versions, *TORCHSERVE_PACKAGES], check=True)
    return python


@contextlib.contextmanager
def running(command: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` (a server on ``port`` of 127.0.0.1) started, its output in ``log``, once its
    ``/ping`` answers 200 (within 180 s); stopped on leaving."""
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_ping(f"http://127.0.0.1:{port}", timeout_s=180, describe=lambda: f"see {log}",
                      exited=lambda: process.poll() is not None)
        yield process
    finally:
        process.terminate()
        process.wait(30)


def build_archive(torchserve_python: Path, *, name: str, engine: str, serialized_file: Path,
                  preprocessing: dict[str, object], class_names: list[str], store: Path,
                  architecture: str | None = None) -> Path:
    """``store/<name>.mar`` for one of ENGINES: ``architecture``'s model file and its weights
    (eager), or ``serialized_file`` alone (a frozen TorchScript file, an ONNX graph); our handler;
    labels."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if serialized_file.suffix != SERIALIZED_SUFFIX[engine] or (engine == "eager") != (architecture is not None):
        raise ValueError(f"an archive for {engine} takes a {SERIALIZED_SUFFIX[engine]} file"
                         + (" and an architecture" if engine == "eager" else " and no architecture")
                         + f", not {serialized_file.name} and {architecture!r}")
    extras = store / f"{name}-extra"
    extras.mkdir(parents=True, exist_ok=True)
    (extras / "index_to_name.json").write_text(json.dumps({str(i): label for i, label in enumerate(class_names)}))
    (extras / "preprocessing.json").write_text(json.dumps(preprocessing | {"engine": engine}))
    archiver = torchserve_python.parent / "torch-model-archiver"
    model_file = ["--model-file", str(TORCHSERVE_FILES / f"{architecture}.py")] if engine == "eager" else []
    subprocess.run([str(archiver), "--model-name", name, "--version", "1.0", *model_file,
                    "--serialized-file", str(serialized_file),
                    "--handler", str(TORCHSERVE_FILES / "handler.py"),
                    "--extra-files", f"{extras / 'index_to_name.json'},{extras / 'preprocessing.json'}",
                    "--export-path", str(store), "--force"], check=True, timeout=300)
    return store / f"{name}.mar"


@dataclass(frozen=True)
class TorchServeConfig:
    """One way of running TorchServe. ``None`` fields keep TorchServe's own defaults."""

    label: str
    workers: int | None = None
    threads: int | None = None  # OMP_NUM_THREADS for the workers
    batch_size: int = 1
    max_batch_delay_ms: int = 100  # TorchServe's default; only matters with batch_size > 1
    engine: str = "eager"  # one of ENGINES: the archive it serves

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")

    def properties(self, model: str, store: Path, ports: tuple[int, ...]) -> str:
        lines = [f"inference_address=http://127.0.0.1:{ports[0]}",
                 f"management_address=http://127.0.0.1:{ports[1]}",
                 f"metrics_address=http://127.0.0.1:{ports[2]}",
                 # gRPC cannot be turned off; its fixed default ports would clash between instances.
                 "grpc_inference_address=127.0.0.1", f"grpc_inference_port={ports[3]}",
                 "grpc_management_address=127.0.0.1", f"grpc_management_port={ports[4]}",
                 f"model_store={store}",
                 f"load_models={model}.mar",
                 "disable_token_authorization=true",
                 # A once-a-minute psutil sampler; off so that idle instances stay idle while
                 # another system is measured (it does not touch the inference path).
                 "disable_system_metrics=true"]
        if self.workers is not None:
            lines.append(f"default_workers_per_model={self.workers}")
        if self.batch_size > 1:
            workers = self.workers or os.cpu_count() or 1
            lines.append("models=" + json.dumps({model: {"1.0": {
                "defaultVersion": True, "marName": f"{model}.mar", "minWorkers": workers, "maxWorkers": workers,
                "batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay_ms, "responseTimeout": 120}}}))
        return "\n".join(lines) + "\n"


class TorchServe:
    """One TorchServe instance serving ``model`` from ``store``, in its own process group."""

    def __init__(self, torchserve_python: Path, config: TorchServeConfig, model: str, store: Path, home: Path) -> None:
        self.config, self.model, self.home = config, model, home
        home.mkdir(parents=True, exist_ok=True)
        (home / "tmp").mkdir(exist_ok=True)
        self.ports = tuple(free_port() for _ in range(5))  # HTTP inference, management, metrics; gRPC x 2
        (home / "config.properties").write_text(config.properties(model, store, self.ports))
        env = {**os.environ, "TMPDIR": str(home / "tmp"), "LOG_LOCATION": str(home / "logs"),
               "METRICS_LOCATION": str(home / "logs"), "PATH": f"{torchserve_python.parent}:{os.environ['PATH']}"}
        if config.threads is not None:
            env["OMP_NUM_THREADS"] = str(config.threads)
        command = [str(torchserve_python.parent / "torchserve"), "--start", "--foreground", "--ncs",
                   "--disable-token-auth", "--ts-config", str(home / "config.properties"), "--model-store", str(store)]
        self._log = open(home / "stdout.log", "wb")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(command, cwd=home, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}/predictions/{self.model}"

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Until every worker of the model says READY."""
        deadline = time.monotonic() + timeout_s
        management = f"http://127.0.0.1:{self.ports[1]}/models/{self.model}"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"TorchServe ({self.config.label}) exited:\n{self.log_tail()}")
            try:
                workers = httpx.get(management, timeout=2).json()[0]["workers"]
                if workers and all(worker["status"] == "READY" for worker in workers):
                    return
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"TorchServe ({self.config.label}) not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def worker_threads(self) -> list[int]:
        """The torch thread count each worker reported when its handler started."""
        log = (self.home / "logs" / "model_log.log")
        text = log.read_text(errors="replace") if log.exists() else ""
        return [int(part.split("torch threads=")[1].split()[0]) for part in text.splitlines() if "torch threads=" in part]

    def log_tail(self, characters: int = 3000) -> str:
        texts = [path.read_text(errors="replace") for path in (self.home / "stdout.log",) if path.exists()]
        return "".join(texts)[-characters:]

    def stop(self) -> None:
        """End the instance's process group (frontend and workers): SIGTERM, then SIGKILL."""
        if self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=15)
            except ProcessLookupError:
                pass
        try:  # workers left behind by a frontend that died first
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
