"""The batcher alone, carrying out its policy: grouping, parallel passes, thread shares, stopping and
draining (the policy's decisions alone are in test_scheduling.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from serve.batching import Batcher
from serve.errors import InvalidImage, ModelNotFound, NotReady, Overloaded
from serve.scheduling import Policy


class SlowModel:
    """Logits = the inputs' first value; notes each pass's size, torch threads and overlap."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.passes: list[tuple[int, int]] = []  # (batch size, torch threads)
        self.thread_names: list[str] = []
        self.running = self.most_running = 0
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.passes.append((len(batch), torch.get_num_threads() if threads is None else threads))
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
        policy = Policy(cores=threads, passes=parallel, max_batch_size=options.pop("max_batch_size", 8))
        batcher = Batcher(model, executor, policy=policy, max_queue=64, wide_executor=wide, **options)
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


def test_single_threaded_passes_run_side_by_side_on_the_shared_threads() -> None:
    """One core a pass, two passes: under load both run at once (none waits for the wide thread)."""
    model = SlowModel(0.05)
    asyncio.run(run(model, [1.0] * 8, parallel=2, threads=1, max_batch_size=1))
    assert model.most_running == 2
    assert [threads for _, threads in model.passes] == [1] * 8


@contextlib.asynccontextmanager
async def two_cores(model: SlowModel, *, max_batch_size: int) -> AsyncIterator[Batcher]:
    """A started batcher for two cores: two single-threaded passes side by side, or one with two threads."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shared") as executor, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="wide") as wide:
        batcher = Batcher(model, executor, policy=Policy(cores=2, passes=2, max_batch_size=max_batch_size),
                          max_queue=64, wide_executor=wide)
        batcher.start()
        try:
            yield batcher
        finally:
            await batcher.stop()


def test_no_pass_starts_wide_while_a_request_is_on_its_way() -> None:
    async def scenario(model: SlowModel) -> None:
        async with two_cores(model, max_batch_size=8) as batcher:
            with batcher.incoming():  # a second request is being decoded while the first is submitted
                first = asyncio.ensure_future(batcher.submit(image(1.0)))
                await asyncio.sleep(0.02)
            second = await batcher.submit(image(2.0))
            await first
            third = await batcher.submit(image(3.0))  # nothing else in sight now
            assert [float(logits[0, 0]) for logits, _ in (second, third)] == [2.0, 3.0]

    model = SlowModel(0.05)
    asyncio.run(scenario(model))
    assert [threads for _, threads in model.passes] == [1, 1, 2]
    assert model.thread_names[-1].startswith("wide")


def test_a_pass_beside_another_takes_its_fair_share_of_the_queue() -> None:
    async def scenario(model: SlowModel) -> None:
        with ThreadPoolExecutor(max_workers=2) as executor:
            batcher = Batcher(model, executor, policy=Policy(cores=None, passes=2, max_batch_size=16), max_queue=64)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit(image(0.0)))
            await asyncio.sleep(0.02)  # running alone: the next seven arrive together beside it
            await asyncio.gather(first, *(batcher.submit(image(float(n))) for n in range(1, 8)))
            await batcher.stop()

    model = SlowModel(0.1)
    asyncio.run(scenario(model))
    # Eight images in the batcher, two passes: at most four in the pass beside the running one.
    assert [size for size, _ in model.passes][:2] == [1, 4]
    assert sum(size for size, _ in model.passes) == 8


def test_inputs_made_by_the_pass_and_a_failure_stays_with_its_request() -> None:
    def made(value: float) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            time.sleep(0.005)
            if value < 0:
                raise InvalidImage(f"image {value} is damaged")
            made_on.append(threading.current_thread().name)
            return image(value)
        return make

    async def scenario() -> list[object]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shared") as executor:
            batcher = Batcher(model, executor, policy=Policy(cores=None, max_batch_size=8), max_queue=64)
            batcher.start()
            blocker = asyncio.ensure_future(batcher.submit(image(0.0)))  # the next three queue behind it
            await asyncio.sleep(0.01)
            outcomes = await asyncio.gather(*(batcher.submit(made(value)) for value in (1.0, -1.0, 2.0)),
                                            return_exceptions=True)
            await blocker
            await batcher.stop()
            return outcomes

    model, made_on = SlowModel(0.05), []
    first, failed, second = asyncio.run(scenario())
    assert isinstance(failed, InvalidImage) and "-1.0" in str(failed)
    assert [float(logits[0, 0]) for logits, _ in (first, second)] == [1.0, 2.0]  # type: ignore[index]
    timing = first[1]  # type: ignore[index]
    assert timing.batch_size == 2 and timing.prepare_s >= 0.005
    assert model.passes[-1][0] == 2  # one pass for the two good ones
    assert all(name.startswith("shared") for name in made_on)  # made on the pass's own thread


def test_stop_fails_queued_requests_with_the_closed_error() -> None:
    async def scenario() -> list[object]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(SlowModel(0.2), executor, policy=Policy(cores=None, max_batch_size=1), max_queue=64,
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
            batcher = Batcher(SlowModel(0.05), executor, policy=Policy(cores=None, passes=2, max_batch_size=1),
                              max_queue=64)
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


def test_a_pass_never_mixes_rows_of_different_shapes_or_types() -> None:
    """Tensors that cannot be concatenated go to passes of their own, in their turn."""
    shapes: list[tuple[int, ...]] = []
    release = threading.Event()

    def infer(batch: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        shapes.append(tuple(batch.shape))
        release.wait(10)
        return batch.sum(dim=tuple(range(1, batch.dim())))

    async def send() -> list:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = Batcher(infer, pool, policy=Policy(cores=None, max_batch_size=16), max_queue=64)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit(torch.ones(1, 3)))
            while not shapes:
                await asyncio.sleep(0.005)
            waiting = [asyncio.ensure_future(batcher.submit(tensor)) for tensor in
                       (torch.ones(2, 3), torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 4))]
            await asyncio.sleep(0)  # all three queued behind the first pass
            release.set()
            results = await asyncio.gather(first, *waiting)
            await batcher.stop()
            return results

    results = asyncio.run(send())
    assert [rows.tolist() for rows, _ in results] == [[3.0], [3.0, 3.0], [3.0], [4.0]]
    assert shapes == [(1, 3), (2, 3), (1, 3), (1, 4)]


def test_a_request_larger_than_the_queue_is_taken_when_nothing_waits() -> None:
    async def send() -> tuple[int, type[Exception]]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            release, started = threading.Event(), threading.Event()

            def infer(batch: torch.Tensor, threads: int | None = None) -> torch.Tensor:
                started.set()
                release.wait(10)
                return batch.sum(dim=1)

            batcher = Batcher(infer, pool, policy=Policy(cores=None, max_batch_size=4), max_queue=8)
            batcher.start()
            big = asyncio.ensure_future(batcher.submit(torch.ones(20, 2)))  # nothing waits: taken
            while not started.is_set():
                await asyncio.sleep(0.005)
            second = asyncio.ensure_future(batcher.submit(torch.ones(20, 2)))  # one in a pass, none queued
            await asyncio.sleep(0)  # second is queued now: the queue holds 20 rows
            third = asyncio.ensure_future(batcher.submit(torch.ones(1, 2)))  # beyond the queue
            refused = await asyncio.gather(third, return_exceptions=True)
            release.set()
            rows = [len(result[0]) for result in await asyncio.gather(big, second)]
            await batcher.stop()
            return sum(rows), type(refused[0])

    total, refused = asyncio.run(send())
    assert total == 40 and refused is Overloaded


def test_with_isolated_failures_a_failing_shared_pass_fails_only_the_request_that_broke_it() -> None:
    def infer(batch: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        if (batch < 0).any():
            raise ValueError("negative input")
        return batch.sum(dim=1)

    async def send() -> list:
        with ThreadPoolExecutor(max_workers=1) as pool:
            release = threading.Event()
            started = threading.Event()

            def gate(batch: torch.Tensor, threads: int | None = None) -> torch.Tensor:
                if not started.is_set():
                    started.set()
                    release.wait(10)
                return infer(batch)

            batcher = Batcher(gate, pool, policy=Policy(cores=None, max_batch_size=16), max_queue=64,
                              isolate_failures=True)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit(torch.ones(1, 2)))
            while not started.is_set():
                await asyncio.sleep(0.005)
            queued = [asyncio.ensure_future(batcher.submit(tensor))
                      for tensor in (torch.ones(1, 2), -torch.ones(1, 2), torch.full((2, 2), 2.0))]
            await asyncio.sleep(0)
            release.set()
            results = await asyncio.gather(first, *queued, return_exceptions=True)
            await batcher.stop()
            return results

    first, good, bad, other = asyncio.run(send())
    assert first[0].tolist() == [2.0] and good[0].tolist() == [2.0] and other[0].tolist() == [4.0, 4.0]
    assert isinstance(bad, ValueError)
