"""The service behind the routes: the policy it gives each model, where and how a request is
decoded, the order of its checks, and its lifecycle around stopping."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from serve.app import create_app
from serve.errors import NotReady
from serve.predictor import Predictor
from serve.scheduling import PROBE_BATCH, PassTimes
from serve.service import Health, Service
from serve.settings import Settings

from imagedata import encode


@pytest.fixture
def service() -> Iterator[Service]:
    service = Service(Settings(threads_per_worker=2, inference_threads=2), load_predictor=lambda: None)  # type: ignore[arg-type,return-value]
    yield service
    for pool in (service.decode_pool, service.wide_pool, service.shared_pool, service.handler_pool):
        pool.shutdown()


def test_a_gpu_model_gets_one_pass_at_a_time_decoded_beforehand(service: Service) -> None:
    # An image that took 75 ms alone, and 74 ms each in a batch: a CPU pass takes no more than one;
    # on a GPU a batch pays anyway.
    timed = PassTimes(one_s=0.075, batched_s=0.074)
    gpu = service.policy(SimpleNamespace(device=torch.device("cuda"), pass_times=timed))  # type: ignore[arg-type]
    cpu = service.policy(SimpleNamespace(device=torch.device("cpu"), pass_times=timed))  # type: ignore[arg-type]
    assert (gpu.passes, gpu.may_decode_in_pass, gpu.widths(), gpu.useful_batch) == (1, False, (2,), 16)
    assert (cpu.passes, cpu.may_decode_in_pass, cpu.widths(), cpu.useful_batch) == (2, True, (1, 2), 1)


def test_warming_up_times_passes_where_passes_beside_others_run(service: Service, tiny_artifact: Path) -> None:
    """The batcher's policy bounds batches by passes timed with a narrow pass's threads, on a thread
    of their own (no shared pass thread is taken from models already serving)."""
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")
    passes: list[tuple[int, int | None, str]] = []
    infer = predictor.infer

    def watched(batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        passes.append((len(batch), threads, threading.current_thread().name))
        return infer(batch, threads)

    predictor.infer = watched  # type: ignore[method-assign]
    assert predictor.pass_times is None
    service.warm_up(predictor)
    times = predictor.pass_times
    assert times is not None and times.one_s > 0 and times.batched_s is not None and times.batched_s > 0
    # Two timed passes of one image and two of PROBE_BATCH, one thread each (two cores, two passes).
    assert [(size, threads) for size, threads, _ in passes[-4:]] == [(1, 1), (1, 1), (PROBE_BATCH, 1), (PROBE_BATCH, 1)]
    assert all(thread.startswith("timing") for _, _, thread in passes[-4:])
    batcher = service.make_batcher(predictor, "model")
    assert batcher is not None and batcher.policy.times == times


def test_a_gpu_model_is_warmed_up_but_not_timed(service: Service) -> None:
    """A GPU gains from batches in the engine itself: its batches are not bounded by timings."""
    calls: list[str] = []
    gpu = SimpleNamespace(device=torch.device("cuda"), pass_times=None,
                          warm_up=lambda threads=None: calls.append("warm-up"),
                          time_pass=lambda threads, batch=1, runs=2: calls.append("timed") or 0.01)
    service.warm_up(gpu)  # type: ignore[arg-type]
    assert calls == ["warm-up"] and gpu.pass_times is None


def test_an_image_decoded_inside_a_wide_pass_is_decoded_single_threaded(service: Service,
                                                                         tiny_artifact: Path) -> None:
    """The pass's cores are the engine's: an OpenMP team left spinning after preprocessing would
    take them from ONNX Runtime's threads."""
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")
    seen: list[int] = []

    def in_a_wide_pass() -> None:
        torch.set_num_threads(2)
        service._prepare_image(predictor, encode(Image.new("RGB", (40, 40), "red")))
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=in_a_wide_pass)
    thread.start()
    thread.join()
    assert seen == [1]


def test_a_bad_header_is_refused_before_the_body_is_read(tiny_artifact: Path) -> None:
    """An Accept the server cannot answer: 406 at once, not after uploading (or a 413 for the size)."""
    settings = Settings(model_dir=tiny_artifact, default_model=False, max_body_bytes=50_000)
    app = create_app(settings, lambda: Predictor.load(tiny_artifact, allow_default=False, device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        while client.get("/ping").status_code != 200:
            pass
        too_large = b"x" * 60_000
        response = client.post("/invocations", content=too_large, headers={"Content-Type": "image/png",
                                                                             "Accept": "text/html"})
        assert response.status_code == 406, response.text
        response = client.post("/invocations", content=too_large, headers={
            "Content-Type": "image/png", "X-Amzn-SageMaker-Custom-Attributes": "top_k=zero"})
        assert response.status_code == 400 and "top_k" in response.json()["error"]["message"]


def test_a_model_that_finishes_loading_after_the_stop_is_not_served(service: Service, tiny_artifact: Path) -> None:
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")

    async def scenario() -> None:
        await service.stop()
        service._serve_single(predictor)  # the loader thread's hand-over, arriving late
        assert service.health is Health.LOADING and service.registry.batchers() == []
        with pytest.raises(NotReady, match="stopping"):
            service.model()

    asyncio.run(scenario())


def test_a_model_that_cannot_join_the_registry_fails_the_load_with_its_reason(service: Service) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("no batcher")

    service.registry.add = refuse  # type: ignore[method-assign]
    service._serve_single(SimpleNamespace())  # type: ignore[arg-type]
    assert service.health is Health.FAILED and service.reason == "ValueError: no batcher"


def test_a_model_that_fails_a_batch_at_warm_up_is_served_one_image_a_pass(
        service: Service, tiny_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A network that answers one image but fails on several (a fixed batch size, say) still loads;
    a batch would fail every request in it, so each pass takes one image, and the log says why."""
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")
    infer = predictor.infer

    def one_at_a_time(batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        if len(batch) > 1:
            raise RuntimeError("this network takes one image at a time")
        return infer(batch, threads)

    predictor.infer = one_at_a_time  # type: ignore[method-assign]
    service.warm_up(predictor)
    assert predictor.pass_times is not None and predictor.pass_times.batched_s is None
    assert service.policy(predictor).useful_batch == 1
    assert f"a pass of {PROBE_BATCH} images failed" in caplog.text


def test_a_model_that_fails_a_narrow_pass_does_not_load(service: Service, tiny_artifact: Path) -> None:
    """Passes beside others serve requests under load: failing one is failing to load, however the
    wide warm-up pass went."""
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")
    infer = predictor.infer

    def wide_only(batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        if threads == 1:
            raise RuntimeError("no single-threaded session")
        return infer(batch, threads)

    predictor.infer = wide_only  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="no single-threaded session"):
        service.warm_up(predictor)
    assert predictor.pass_times is None


def test_a_batch_short_of_memory_at_warm_up_fails_the_attempt_rather_than_the_batching(
        service: Service, tiny_artifact: Path) -> None:
    """A shortage that may pass is the load's to retry, not a reason to serve one image a pass for good."""
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")
    infer = predictor.infer

    def short_of_memory(batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        if len(batch) > 1:
            raise MemoryError
        return infer(batch, threads)

    predictor.infer = short_of_memory  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        service.warm_up(predictor)
    assert predictor.pass_times is None
