"""Dynamic batching: requests that wait for the model at the same time share one forward pass.

The batcher never holds a lone request back: with no delay (the default) it runs whatever is
queued the moment a pass can start, so a single request costs one forward pass and concurrent
requests are grouped while earlier passes run. Requests over ``max_queue`` queued images are
refused at once. Each model has its own batcher, so one forward pass never mixes two models'
inputs.

What the batcher decides nothing about: when a pass may start, how many images it takes, how many
threads it runs with and whether a request is decoded inside it are the model's
:class:`~serve.scheduling.Policy`'s answers to what the batcher shows it. The batcher carries
them out: it runs up to ``policy.passes`` passes at once, each on a thread of its executor (a pass
with every core on the one wide thread), and hands each pass its thread count explicitly:
``infer(batch, threads)``.

A request may also be submitted undecoded, as a function that makes its inputs: the pass that
takes it runs the function on its own thread just before the forward pass, as one process of the
raw pipeline would. A request whose inputs cannot be made fails alone; the rest of its pass goes
on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch

from serve.errors import NotReady, Overloaded
from serve.scheduling import Backlog, Policy

logger = logging.getLogger(__name__)


# A request's images (or, for batched handlers, its rows: a tensor or array), or a function that makes them.
Inputs = torch.Tensor | np.ndarray | Callable[[], torch.Tensor]
ROWS = (torch.Tensor, np.ndarray)


@dataclass
class _Job:
    inputs: Inputs
    images: int
    future: asyncio.Future[tuple[np.ndarray, int]]
    queued_at: float = field(default_factory=time.perf_counter)
    prepare_s: float = 0.0  # making the inputs, when the pass did it
    forward_at: float = 0.0  # when its forward pass began
    error: Exception | None = None  # making its inputs failed, or its own pass did
    result: object = None  # its answer from a pass of its own, after a shared pass failed


@dataclass(frozen=True)
class Timing:
    queue_s: float  # waiting for a pass, and in it while other requests' inputs were made
    inference_s: float
    batch_size: int
    prepare_s: float = 0.0  # making the inputs inside the pass (0 when they came ready)


def _stackable(first: Inputs, other: Inputs) -> bool:
    """Whether two requests' inputs can share a pass: any whose inputs are made in the pass (always
    the model's input shape); tensors, or arrays, only of the same shape past the first dimension,
    type (and device)."""
    if not isinstance(first, ROWS) or not isinstance(other, ROWS):
        return True
    if isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor):
        return first.shape[1:] == other.shape[1:] and first.dtype == other.dtype and first.device == other.device
    if isinstance(first, np.ndarray) and isinstance(other, np.ndarray):
        return first.shape[1:] == other.shape[1:] and first.dtype == other.dtype
    return False


class Batcher:
    def __init__(self, infer: Callable[[Inputs, int | None], np.ndarray], executor: Executor, *, policy: Policy,
                 max_queue: int, wide_executor: Executor | None = None, isolate_failures: bool = False,
                 on_batch: Callable[[int], None] = lambda size: None,
                 closed_error: Callable[[], Exception] = lambda: NotReady("the model is being unloaded",
                                                                           headers={"Retry-After": "1"})) -> None:
        """``infer(batch, threads)``: one forward pass with that many threads (None: the thread's
        own setting). ``executor`` needs at least ``policy.passes`` threads; passes with every core
        run on ``wide_executor`` (one thread: one OpenMP team in the process)."""
        self._infer = infer
        self._executor = executor
        self._wide_executor = wide_executor or executor
        self.policy = policy
        self._max_queue = max_queue
        self._on_batch = on_batch
        # A shared pass that fails is run again request by request, so that only the request whose
        # inputs broke it fails (user code, whose failures may come from one request's data).
        self._isolate_failures = isolate_failures
        self._closed_error = closed_error  # what a request gets once the model is going away
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._incoming = 0  # requests being prepared that will be submitted next
        self._images_in_passes = 0  # images in the passes running now
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._passes: dict[asyncio.Task[None], float] = {}  # forward passes running now, and when each began
        self._closed = False

    def backlog(self) -> Backlog:
        """What this batcher holds now, as its policy reads it."""
        return Backlog(queued_requests=len(self._queue), queued_images=self._queued_images,
                       running_passes=len(self._passes), images_in_passes=self._images_in_passes,
                       incoming=self._incoming)

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
        self._queued_images = self._images_in_passes = 0

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

    def longest_pass_s(self) -> float:
        """How long the oldest forward pass running now has been running (0 when none is)."""
        return time.monotonic() - min(self._passes.values()) if self._passes else 0.0

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Around preparing a request's inputs (decoding), so the policy sees it on its way;
        submit right after, without awaiting anything in between."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def submit(self, inputs: Inputs, images: int = 1) -> tuple[np.ndarray, Timing]:
        """Logits for ``inputs`` (one request's images), computed in some batch. ``inputs`` may be a
        function that makes them (``images`` of them), run on the thread of the pass that takes it;
        what it raises is raised here."""
        if isinstance(inputs, ROWS):
            images = len(inputs)
        if self._closed:
            raise self._closed_error()
        # A request larger than the whole queue is taken when nothing waits: it would never fit.
        if self._queued_images and self._queued_images + images > self._max_queue:
            raise Overloaded("too many images are waiting for the model; retry shortly", headers={"Retry-After": "1"})
        job = _Job(inputs, images, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_images += images
        self._wakeup.set()
        logits, batch_size = await job.future
        done = time.perf_counter()
        return logits, Timing(job.forward_at - job.queued_at - job.prepare_s, done - job.forward_at, batch_size,
                              job.prepare_s)

    def _take_batch(self) -> list[_Job]:
        limit = self.policy.batch_limit(self.backlog())
        jobs: list[_Job] = []
        size = 0
        while self._queue and (not jobs or (size + self._queue[0].images <= limit
                                            and _stackable(jobs[0].inputs, self._queue[0].inputs))):
            job = self._queue.popleft()
            self._queued_images -= job.images
            if job.future.cancelled():  # its request timed out or went away while queued
                continue
            jobs.append(job)
            size += job.images
        return jobs

    async def _run(self) -> None:
        while True:
            if not self.policy.can_start(self.backlog()):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if delay_s := self.policy.delay_s(self.backlog()):
                await asyncio.sleep(delay_s)
            jobs = self._take_batch()
            if not jobs:
                continue
            plan = self.policy.next_pass(self.backlog())
            executor = self._wide_executor if plan.wide else self._executor
            task = asyncio.get_running_loop().create_task(self._run_pass(jobs, executor, plan.threads))
            self._passes[task] = time.monotonic()
            self._images_in_passes += sum(job.images for job in jobs)
            task.add_done_callback(self._pass_done)

    def _pass_done(self, task: asyncio.Task[None]) -> None:
        self._passes.pop(task, None)
        self._wakeup.set()  # a pass can start

    def _forward(self, jobs: list[_Job], threads: int | None) -> np.ndarray | None:
        """On the pass's thread: make the inputs that came undecoded, then one forward pass over
        the jobs whose inputs are there (None if there are none)."""
        for job in jobs:
            if not isinstance(job.inputs, ROWS):
                began = time.perf_counter()
                try:
                    job.inputs = job.inputs()
                except Exception as exc:  # noqa: BLE001 - the request's own error, raised to it alone
                    job.error = exc
                job.prepare_s = time.perf_counter() - began
        ready = [job for job in jobs if job.error is None]
        forward_at = time.perf_counter()
        for job in jobs:
            job.forward_at = forward_at
        if not ready:
            return None
        inputs = [job.inputs for job in ready]
        concatenate = np.concatenate if isinstance(inputs[0], np.ndarray) else torch.cat
        try:
            return self._infer(inputs[0] if len(inputs) == 1 else concatenate(inputs), threads)  # type: ignore[arg-type]
        except Exception:
            if not self._isolate_failures or len(ready) == 1:
                raise
        logger.warning("a pass shared by %d requests failed; running each alone", len(ready), exc_info=True)
        for job in ready:
            if job.future.done():  # its request timed out or went away meanwhile
                continue
            try:
                job.result = self._infer(job.inputs, threads)[0 : len(job.inputs)]  # type: ignore[arg-type,index]
            except Exception as exc:  # noqa: BLE001 - this request's own failure, raised to it alone
                job.error = exc
        return None

    async def _run_pass(self, jobs: list[_Job], executor: Executor, threads: int | None) -> None:
        try:
            await self._forward_pass(jobs, executor, threads)
        finally:
            # Before the answers are delivered: a client that submits again at once must not
            # find these requests still counted.
            self._images_in_passes -= sum(job.images for job in jobs)

    async def _forward_pass(self, jobs: list[_Job], executor: Executor, threads: int | None) -> None:
        try:
            logits = await asyncio.get_running_loop().run_in_executor(executor, self._forward, jobs, threads)
        except asyncio.CancelledError:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(self._closed_error())
            raise
        except Exception as exc:
            logger.exception("inference failed for a batch of %d", sum(job.images for job in jobs if job.error is None))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(job.error or exc)
            return
        ready = [job for job in jobs if job.error is None]
        batch_size = sum(len(job.inputs) for job in ready)  # type: ignore[arg-type]
        if ready:
            self._on_batch(batch_size)
        offset = 0
        for job in jobs:
            if job.error is not None:
                if not job.future.done():
                    job.future.set_exception(job.error)
                continue
            size = len(job.inputs)  # type: ignore[arg-type]
            if job.future.done():
                pass
            elif job.result is not None:  # it ran alone after its shared pass failed
                job.future.set_result((job.result, size))  # type: ignore[arg-type]
            else:
                assert logits is not None
                job.future.set_result((logits[offset : offset + size], batch_size))
            offset += size
