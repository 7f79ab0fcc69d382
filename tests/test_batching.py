"""The batcher alone: grouping, parallel passes, thread shares, stopping and draining."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from serve.batching import Batcher
from serve.errors import ModelNotFound, NotReady


class SlowModel:
    """Logits = the inputs' first value; notes each pass's size, torch threads and overlap."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.passes: list[tuple[int, int]] = []  # (batch size, torch threads)
        self.thread_names: list[str] = []
        self.running = self.most_running = 0
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.passes.append((len(batch), torch.get_num_threads()))
            self.thread_names.append(threading.current_thread().name)
        time.sleep(self.delay_s)
        with self.lock:
            self.running -= 1
        return batch[:, :1].numpy()


def image(value: float) -> torch.Tensor:
    return torch.full((1, 3), value)


async def run(model: SlowModel, values: list[float], *, parallel: int, threads: int | None,
              stagger_s: float = 0.0, **options: object) -> list[float]:
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="shared") as executor, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="wide") as wide:
        batcher = Batcher(model, executor, max_batch_size=options.pop("max_batch_size", 8), max_delay_s=0,
                          max_queue=64, parallel=parallel, threads=threads, wide_executor=wide, **options)
        batcher.start()

        async def one(value: float, position: int) -> float:
            await asyncio.sleep(stagger_s * position)
            logits, _ = await batcher.submit(image(value))
            return float(logits[0, 0])

        results = await asyncio.gather(*(one(value, n) for n, value in enumerate(values)))
        await batcher.stop()
    return results


def test_answers_go_back_to_their_own_requests() -> None:
    model = SlowModel(0.02)
    values = [float(n) for n in range(20)]
    assert asyncio.run(run(model, values, parallel=2, threads=None)) == values
    assert sum(size for size, _ in model.passes) == 20
    assert max(size for size, _ in model.passes) > 1  # grouped while earlier passes ran


def test_passes_run_side_by_side_up_to_parallel() -> None:
    model = SlowModel(0.05)
    asyncio.run(run(model, [1.0] * 12, parallel=3, threads=None, max_batch_size=1))
    assert model.most_running == 3
    alone = SlowModel(0.01)
    asyncio.run(run(alone, [1.0] * 6, parallel=1, threads=None, max_batch_size=1))
    assert alone.most_running == 1


def test_a_lone_pass_gets_every_thread_and_side_by_side_passes_share_them() -> None:
    lone = SlowModel(0.01)
    asyncio.run(run(lone, [1.0] * 3, parallel=2, threads=2, stagger_s=0.05))  # one at a time
    assert [threads for _, threads in lone.passes] == [2, 2, 2]
    # Every multi-threaded pass runs on the one wide thread: one OpenMP team in the process.
    assert all(name.startswith("wide") for name in lone.thread_names)
    busy = SlowModel(0.05)
    asyncio.run(run(busy, [1.0] * 8, parallel=2, threads=2, max_batch_size=1))  # always something queued
    assert [threads for _, threads in busy.passes][1:] == [1] * 7
    assert all(name.startswith("shared") for name in busy.thread_names[1:])


def test_stop_fails_queued_requests_with_the_closed_error() -> None:
    async def scenario() -> list[object]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(SlowModel(0.2), executor, max_batch_size=1, max_delay_s=0, max_queue=64,
                              closed_error=lambda: ModelNotFound("gone"))
            batcher.start()
            requests = [asyncio.ensure_future(batcher.submit(image(1.0))) for _ in range(3)]
            await asyncio.sleep(0.05)
            await batcher.stop()
            outcomes = await asyncio.gather(*requests, return_exceptions=True)
            with pytest.raises(ModelNotFound):
                await batcher.submit(image(1.0))
            return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, ModelNotFound) for outcome in outcomes)


def test_drain_answers_what_is_queued_then_refuses() -> None:
    async def scenario() -> tuple[list[object], float]:
        with ThreadPoolExecutor(max_workers=2) as executor:
            batcher = Batcher(SlowModel(0.05), executor, max_batch_size=1, max_delay_s=0, max_queue=64, parallel=2)
            batcher.start()
            requests = [asyncio.ensure_future(batcher.submit(image(float(n)))) for n in range(4)]
            await asyncio.sleep(0.01)
            started = time.monotonic()
            await batcher.drain(timeout_s=10)
            with pytest.raises(NotReady):
                await batcher.submit(image(1.0))
            return await asyncio.gather(*requests), time.monotonic() - started

    answers, took = asyncio.run(scenario())
    assert [float(logits[0, 0]) for logits, _ in answers] == [0.0, 1.0, 2.0, 3.0]
    assert took < 5
