"""When a forward pass starts, what it takes and how wide it runs: one small policy per model.

Two quantities describe a worker's cores, each with one name here:

- ``cores``: the threads one pass may use when it runs alone (``CLASSIFIER_THREADS_PER_WORKER``);
- ``passes``: how many passes may run side by side (``CLASSIFIER_INFERENCE_THREADS`` on a CPU;
  one on a GPU, which runs one pass at a time anyway).

A pass is *wide* (every core) when it starts with nothing else in sight: no pass running, nothing
queued and no request on its way. Otherwise it is *narrow*: ``cores // passes`` threads, so
that in one worker process, at the default settings, passes side by side never ask for more
threads than there are cores (with several workers, each may run a narrow pass on every core, and
busy workers share them).
A narrow pass takes at most its fair share of the images in sight (queued or in passes, divided
by ``passes``, rounded up): a pass starting beside another does not take the whole queue while
the other core soon idles.

On a CPU a pass takes more than one image only where that pays. A batch pays in two ways: the
engine may cost each image less in a batch than alone, or the batch spreads what every pass costs
whatever it holds (hand-offs between threads, the engine's call) over more images, which counts
only while passes are short. Where neither holds, every image of a batch just waits for all the
others. So, by two passes timed at warm-up (:class:`PassTimes`): when a batch of ``PROBE_BATCH``
costs each image at least ``BATCH_SAVING`` less than one alone, a pass takes up to
``max_batch_size``; otherwise at most as many images as fit in ``BATCH_WORK_S`` of work; and one,
where the batch failed.

A lone small image is decoded by the pass that classifies it, on the pass's thread (no hand-over
between threads), when the model runs on a CPU and passes can run side by side (or a pass has one
core): then decoding uses a core that would otherwise wait. Anything larger, by body or by pixels,
is decoded beforehand on the decode pool, under the memory gate, so no slow decode holds up a
batch. bench/results/scheduling.md has the measurements behind each rule.

The policy holds no state, no clock and no threads: the batcher describes what it sees
(:class:`Backlog`), the policy answers (:class:`Pass`), so every decision is tested without sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The largest single image a pass decodes itself: by body, and by pixels once decoded (a few
# kilobytes of PNG can hold tens of megapixels).
DECODE_IN_PASS_MAX_BYTES = 256 * 1024
DECODE_IN_PASS_MAX_PIXELS = 2_000_000
# When a CPU pass batches (see above): the batch timed at warm-up, the saving per image that makes
# any batch worth it, and otherwise the work one pass may gather.
PROBE_BATCH = 4
BATCH_SAVING = 0.1
BATCH_WORK_S = 0.05


@dataclass(frozen=True)
class Backlog:
    """What a model's batcher holds at a decision: requests queued, the passes running now, and
    requests being decoded that will be queued next (``incoming``)."""

    queued_requests: int = 0
    queued_images: int = 0
    running_passes: int = 0
    images_in_passes: int = 0
    incoming: int = 0


@dataclass(frozen=True)
class PassTimes:
    """A CPU pass timed at warm-up with a narrow pass's threads: seconds for one image alone, and
    each image's share of a pass of ``PROBE_BATCH`` (None: that pass failed). Each is the fastest
    of a few passes on a machine that may be busy, so a model near ``BATCH_SAVING`` may be judged
    either way from one start to the next."""

    one_s: float
    batched_s: float | None


@dataclass(frozen=True)
class Pass:
    """How the next forward pass runs: with ``threads`` threads (None: the thread's own setting),
    and ``wide`` when it has every core to itself (the batcher runs it on its one wide thread)."""

    threads: int | None
    wide: bool


class Policy:
    def __init__(self, *, cores: int | None, passes: int = 1, max_batch_size: int = 16, max_delay_s: float = 0.0,
                 decode_in_pass: bool = False, times: PassTimes | None = None) -> None:
        """``cores``: threads for a lone pass (None: threads are never set, and no pass is wide).
        ``decode_in_pass``: whether this model's passes may decode their own small images (a model
        on a CPU); it holds when passes run side by side or a pass has one core. ``times``: its CPU
        passes timed at warm-up (None: not timed, so batches are bounded only by ``max_batch_size``
        and the fair share)."""
        if passes < 1 or max_batch_size < 1 or (cores is not None and cores < 1):
            raise ValueError("cores, passes and max_batch_size must be at least 1")
        self.cores = cores
        self.passes = passes
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.may_decode_in_pass = decode_in_pass and (passes > 1 or cores == 1)
        self.times = times

    @property
    def narrow_threads(self) -> int | None:
        """Threads for a pass that may have others beside it: an equal share of the cores."""
        return None if self.cores is None else max(1, self.cores // self.passes)

    @property
    def useful_batch(self) -> int:
        """The most images worth one pass: ``max_batch_size`` where a batch pays per image (or the
        passes were not timed), one where a batch failed, else as many as fit in ``BATCH_WORK_S``
        of work (at least one)."""
        times = self.times
        if times is None or times.one_s <= 0:
            return self.max_batch_size
        if times.batched_s is None:
            return 1
        if times.batched_s <= times.one_s * (1 - BATCH_SAVING):
            return self.max_batch_size
        return max(1, min(self.max_batch_size, int(BATCH_WORK_S / times.one_s)))

    def widths(self) -> tuple[int, ...]:
        """Every thread count a pass may be given (an engine may prepare a session for each)."""
        if self.cores is None or self.narrow_threads is None:
            return ()
        return tuple(sorted({self.cores, self.narrow_threads}))

    def can_start(self, backlog: Backlog) -> bool:
        """Whether a pass may start now: something is queued and a pass slot is free."""
        return backlog.queued_requests > 0 and backlog.running_passes < self.passes

    def delay_s(self, backlog: Backlog) -> float:
        """How long to wait for more requests before taking a batch (``max_delay_s`` while the
        queue holds less than a useful batch; none by default)."""
        return self.max_delay_s if self.max_delay_s > 0 and backlog.queued_images < self.useful_batch else 0.0

    def batch_limit(self, backlog: Backlog) -> int:
        """The most images the next pass may take: a useful batch, or with passes side by side its
        fair share of the images in sight if that is less."""
        share = -(-(backlog.queued_images + backlog.images_in_passes) // self.passes)
        return min(self.useful_batch, max(1, share))

    def next_pass(self, backlog: Backlog) -> Pass:
        """How the pass whose batch was just taken runs (``backlog``: what is left besides it)."""
        if self.cores is None:
            return Pass(None, wide=False)
        alone = backlog.running_passes == 0 and backlog.queued_requests == 0 and backlog.incoming == 0
        # A pass with every core to itself (with one pass at a time, every pass) runs on the one
        # wide thread: each thread that runs a multi-threaded PyTorch op owns an OpenMP team.
        wide = alone or self.passes == 1
        return Pass(self.cores if wide else self.narrow_threads, wide=wide)

    def decodes_in_pass(self, body_bytes: int, pixels: Callable[[], int | None]) -> bool:
        """Whether a lone image of ``body_bytes`` is decoded by its pass rather than beforehand;
        ``pixels()`` counts what it decodes to (from its header; None: unknown), asked only for a
        body small enough."""
        if not self.may_decode_in_pass or body_bytes > DECODE_IN_PASS_MAX_BYTES:
            return False
        count = pixels()
        return count is not None and count <= DECODE_IN_PASS_MAX_PIXELS
