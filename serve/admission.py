"""Memory-weighted admission for decoding: how much decoded image memory may exist at once.

A few kilobytes of PNG can hold tens of megapixels, so the body size says nothing of what
decoding costs. Every full-size decode first takes its estimated bytes from one shared
:class:`MemoryGate` and waits while the images already being decoded hold too much; each image is
reduced to the model's input right after decoding, so a request never holds more than one
full-size image at a time.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Peak bytes per decoded pixel: the decoder's own image (up to 4 bytes a pixel, as Pillow stores
# RGB), a rotated copy for EXIF orientation, and the RGB image it becomes (4 bytes a pixel).
BYTES_PER_DECODED_PIXEL = 12


class MemoryGate:
    """A weighted semaphore over bytes, first come first served (a large claim is not starved by
    small ones arriving after it). A claim above the capacity is admitted alone."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError("capacity_bytes must be positive")
        self.capacity = capacity_bytes
        self._held = 0
        self._waiting: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        return self._held

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the capacity for the duration of the block (blocking until its turn)."""
        claim = min(max(nbytes, 0), self.capacity)
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            self._changed.wait_for(lambda: self._waiting[0] is ticket and self._held + claim <= self.capacity)
            self._waiting.popleft()
            self._held += claim
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._changed:
                self._held -= claim
                self._changed.notify_all()
