"""Dynamic batching: requests that wait for the model at the same time share one forward pass.

The batcher never holds a lone request back: with ``max_delay_s`` = 0 (the default) it runs
whatever is queued the moment a pass can start, so a single request costs one forward pass and
concurrent requests are grouped while earlier passes run. A positive delay trades a little
latency for larger batches. Requests over ``max_queue`` queued images are refused at once.
Each model has its own batcher, so one forward pass never mixes two models' inputs.

Up to ``parallel`` passes run at once, each on its own thread of the executor. On a CPU that
beats one pass spread over every core: small convolutions scale poorly across threads, while
independent passes scale almost perfectly (PyTorch releases the GIL inside its kernels). A pass
that starts alone, with nothing else running or queued, may use all ``threads`` torch threads, so
a lone request is as fast as the cores allow; passes side by side get an equal share each.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch

from serve.errors import NotReady, Overloaded

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    inputs: torch.Tensor
    future: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0


@dataclass(frozen=True)
class Timing:
    queue_s: float
    inference_s: float
    batch_size: int


class Batcher:
    def __init__(self, infer: Callable[[torch.Tensor], np.ndarray], executor: Executor, *, max_batch_size: int,
                 max_delay_s: float, max_queue: int, parallel: int = 1, threads: int | None = None,
                 wide_executor: Executor | None = None,
                 on_batch: Callable[[int], None] = lambda size: None,
                 closed_error: Callable[[], Exception] = lambda: NotReady("the model is being unloaded",
                                                                           headers={"Retry-After": "1"})) -> None:
        self._infer = infer
        self._executor = executor  # needs at least ``parallel`` threads
        # Passes that use every torch thread run here (one thread: one OpenMP team in the process).
        self._wide_executor = wide_executor or executor
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._parallel = parallel
        self._threads = threads  # torch threads for a lone pass; None: leave the thread's setting alone
        self._on_batch = on_batch
        self._closed_error = closed_error  # what a request gets once the model is going away
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._passes: set[asyncio.Task[None]] = set()  # forward passes running now
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop at once: requests still queued get the closed error instead of waiting for nothing."""
        self._closed = True
        tasks = [task for task in (self._task, *self._passes) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(self._closed_error())
        self._queued_images = 0

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, finish what is queued or running (for up to ``timeout_s``), then stop."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._passes) and self._task is not None and not self._task.done():
            if time.monotonic() > deadline:
                logger.warning("gave up waiting for %d queued images after %g s", self._queued_images, timeout_s)
                break
            await asyncio.sleep(0.005)
        await self.stop()

    async def submit(self, inputs: torch.Tensor) -> tuple[np.ndarray, Timing]:
        """Logits for ``inputs`` (one request's images), computed in some batch."""
        if self._closed:
            raise self._closed_error()
        if self._queued_images + len(inputs) > self._max_queue:
            raise Overloaded("too many images are waiting for the model; retry shortly", headers={"Retry-After": "1"})
        job = _Job(inputs, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_images += len(inputs)
        self._wakeup.set()
        logits, batch_size = await job.future
        done = time.perf_counter()
        return logits, Timing(job.started_at - job.queued_at, done - job.started_at, batch_size)

    def _take_batch(self) -> list[_Job]:
        jobs, size = [], 0
        while self._queue and (not jobs or size + len(self._queue[0].inputs) <= self._max_batch_size):
            job = self._queue.popleft()
            self._queued_images -= len(job.inputs)
            if job.future.cancelled():  # its request timed out or went away while queued
                continue
            jobs.append(job)
            size += len(job.inputs)
        return jobs

    async def _run(self) -> None:
        while True:
            if not self._queue or len(self._passes) >= self._parallel:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._max_delay_s > 0 and self._queued_images < self._max_batch_size:
                await asyncio.sleep(self._max_delay_s)
            jobs = self._take_batch()
            if not jobs:
                continue
            alone = not self._passes and not self._queue
            threads = self._threads if alone or self._threads is None else max(1, self._threads // self._parallel)
            task = asyncio.get_running_loop().create_task(self._run_pass(jobs, threads))
            self._passes.add(task)
            task.add_done_callback(self._pass_done)

    def _pass_done(self, task: asyncio.Task[None]) -> None:
        self._passes.discard(task)
        self._wakeup.set()  # a pass can start

    def _forward(self, batch: torch.Tensor, threads: int | None) -> np.ndarray:
        if threads is not None:
            torch.set_num_threads(threads)  # this thread's own setting, for this pass
        return self._infer(batch)

    async def _run_pass(self, jobs: list[_Job], threads: int | None) -> None:
        started = time.perf_counter()
        for job in jobs:
            job.started_at = started
        batch = jobs[0].inputs if len(jobs) == 1 else torch.cat([job.inputs for job in jobs])
        self._on_batch(len(batch))
        try:
            executor = self._wide_executor if threads is not None and threads == self._threads else self._executor
            logits = await asyncio.get_running_loop().run_in_executor(executor, self._forward, batch, threads)
        except asyncio.CancelledError:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(self._closed_error())
            raise
        except Exception as exc:
            logger.exception("inference failed for a batch of %d", len(batch))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        offset = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result((logits[offset : offset + len(job.inputs)], len(batch)))
            offset += len(job.inputs)
