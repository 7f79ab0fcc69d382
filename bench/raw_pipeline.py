"""The raw pipeline: the server's own decode, preprocessing and model, in plain processes, no HTTP.

Every image goes through exactly what ``/invocations`` does with it, minus the web layer:
``serve.codec.decode_image`` (the server's decoder: reduced-scale JPEG decode down to the resize
size, as the server does by default, EXIF transpose, RGB),
``Predictor.preprocess`` (the manifest's resize, crop and normalisation), ``Predictor.infer`` on a
stacked batch (with the engine the server would run, or the one asked for) and ``codec.top_k``. A
:class:`RawPool` keeps ``processes`` worker processes with the model loaded and ``threads`` torch
threads each (set before loading, as the server does), so one pool measures several batch sizes
without reloading.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

MAX_PIXELS = 40_000_000  # the server's default CLASSIFIER_MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class RawRun:
    """Images finished in the window, and each batch's seconds per stage (decode ... top_k)."""

    images: int
    duration_s: float
    stages: list[dict[str, float]]

    @property
    def batch_seconds(self) -> list[float]:
        return [sum(stage.values()) for stage in self.stages]

    @property
    def throughput(self) -> float:
        return self.images / self.duration_s


def classify(predictor: Any, bodies: Sequence[bytes]) -> dict[str, float]:
    """Decode, preprocess and classify ``bodies`` as one batch; seconds spent in each stage."""
    import torch

    from serve import codec

    started = time.perf_counter()
    images = [codec.decode_image(body, max_pixels=MAX_PIXELS, min_side=predictor.resize_size) for body in bodies]
    decoded = time.perf_counter()
    batch = torch.stack([predictor.preprocess(image) for image in images])
    preprocessed = time.perf_counter()
    logits = predictor.infer(batch)
    inferred = time.perf_counter()
    codec.top_k(logits, predictor.class_names, 5)
    return {"decode": decoded - started, "preprocess": preprocessed - decoded, "inference": inferred - preprocessed,
            "top_k": time.perf_counter() - inferred}


def _measure(predictor: Any, bodies: Sequence[bytes], *, batch: int, start_at: float, warmup_s: float,
             duration_s: float, max_batches: int) -> tuple[int, list[dict[str, float]]]:
    while time.time() < start_at:  # all processes of the pool start together
        time.sleep(0.001)
    window_opens = time.perf_counter() + warmup_s
    window_closes = window_opens + duration_s
    images, stages, cursor = 0, [], 0
    for _ in range(max_batches):
        if time.perf_counter() >= window_closes:
            break
        chosen = [bodies[(cursor + i) % len(bodies)] for i in range(batch)]
        cursor += batch
        stage = classify(predictor, chosen)
        if window_opens <= time.perf_counter() <= window_closes:
            images += batch
            stages.append(stage)
    return images, stages


def _worker(connection: Connection, model_dir: str | None, bodies: list[bytes], rank: int, threads: int,
            engine: str) -> None:
    """One pool process: load the model once, then answer measurement commands until ``None``."""
    import torch

    from serve.predictor import Predictor
    from serve.settings import Settings

    torch.set_num_threads(threads)
    # Like the server: the artifact when one is given, else the built-in ImageNet model, on the
    # engine asked for (CLASSIFIER_RUNTIME's values), its graph from the server's default cache.
    predictor = Predictor.load(Path(model_dir or "/nonexistent"), allow_default=model_dir is None, device="cpu",
                               threads=threads, engine=engine, graph_cache=Settings.from_env({}).graph_cache)
    predictor.warm_up()
    bodies = bodies[rank:] + bodies[:rank]  # processes start on different photos
    connection.send("ready")
    while (command := connection.recv()) is not None:
        connection.send(_measure(predictor, bodies, **command))


class RawPool:
    """``processes`` spawned workers holding the model; :meth:`run` measures them all at once.
    ``engine``: a CLASSIFIER_RUNTIME value (auto: the server's default)."""

    def __init__(self, processes: int, threads: int, model_dir: Path | None, bodies: Sequence[bytes],
                 engine: str = "auto") -> None:
        context = multiprocessing.get_context("spawn")
        self.processes, self.threads = processes, threads
        self._connections: list[Connection] = []
        self._workers = []
        for rank in range(processes):
            here, there = context.Pipe()
            worker = context.Process(target=_worker, args=(there, str(model_dir) if model_dir else None,
                                                           list(bodies), rank, threads, engine), daemon=True)
            worker.start()
            self._connections.append(here)
            self._workers.append(worker)

    def wait_ready(self, timeout_s: float = 300) -> None:
        for connection in self._connections:
            if not connection.poll(timeout_s) or connection.recv() != "ready":
                raise RuntimeError("a raw-pipeline worker did not load its model")

    def run(self, *, batch: int, warmup_s: float, duration_s: float, max_batches: int = 10_000) -> RawRun:
        command = {"batch": batch, "start_at": time.time() + 0.2, "warmup_s": warmup_s,
                   "duration_s": duration_s, "max_batches": max_batches}
        for connection in self._connections:
            connection.send(command)
        images, stages = 0, []
        for connection in self._connections:
            if not connection.poll(warmup_s + duration_s + 300):
                raise RuntimeError("a raw-pipeline worker did not answer")
            count, worker_stages = connection.recv()
            images += count
            stages += worker_stages
        return RawRun(images, duration_s, stages)

    def close(self) -> None:
        for connection, worker in zip(self._connections, self._workers):
            try:
                connection.send(None)
            except OSError:
                pass
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()
