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
from serve.scheduling import PROBE_BATCH
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
    timed = {"image_s": 0.075, "batched_image_s": 0.074}
    gpu = service.policy(SimpleNamespace(device=torch.device("cuda"), **timed))  # type: ignore[arg-type]
    cpu = service.policy(SimpleNamespace(device=torch.device("cpu"), **timed))  # type: ignore[arg-type]
    assert (gpu.passes, gpu.may_decode_in_pass, gpu.widths(), gpu.useful_batch) == (1, False, (2,), 16)
    assert (cpu.passes, cpu.may_decode_in_pass, cpu.widths(), cpu.useful_batch) == (2, True, (1, 2), 1)


def test_warming_up_times_passes_where_passes_beside_others_run(service: Service, tiny_artifact: Path) -> None:
    """The batcher's policy bounds batches by passes timed with a narrow pass's threads."""
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")
    passes: list[tuple[int, int | None]] = []
    infer = predictor.infer

    def watched(batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        passes.append((len(batch), threads))
        return infer(batch, threads)

    predictor.infer = watched  # type: ignore[method-assign]
    assert predictor.image_s is None
    service.warm_up(predictor)
    assert predictor.image_s is not None and predictor.image_s > 0
    assert predictor.batched_image_s is not None and predictor.batched_image_s > 0
    # Two timed passes of one image and two of PROBE_BATCH, one thread each (two cores, two passes).
    assert passes[-4:] == [(1, 1), (1, 1), (PROBE_BATCH, 1), (PROBE_BATCH, 1)]
    batcher = service.make_batcher(predictor, "model")
    assert batcher is not None
    assert (batcher.policy.image_s, batcher.policy.batched_image_s) == (predictor.image_s, predictor.batched_image_s)


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


def test_a_model_whose_passes_cannot_be_timed_is_served_with_batches_unbounded(
        service: Service, tiny_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The timing only bounds batches: a network that answers one image but fails on four (a
    fixed batch size, say) still loads, and says why its batches are not bounded."""
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu")
    infer = predictor.infer

    def one_at_a_time(batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        if len(batch) > 1:
            raise RuntimeError("this network takes one image at a time")
        return infer(batch, threads)

    predictor.infer = one_at_a_time  # type: ignore[method-assign]
    service.warm_up(predictor)
    assert predictor.batched_image_s is None
    assert service.policy(predictor).useful_batch == service.settings.max_batch_size
    assert "could not time a pass of 4 images" in caplog.text
