"""Admission: how many requests may be in progress, and how much decoded image memory may exist
at once.

:class:`RequestLimit` bounds the requests that carry a body (``POST``) being served at once:
each may hold up to the body limit in memory, so their number bounds that memory. Beyond the
limit a request is answered 503 with ``Retry-After`` before its body is read; ``/ping`` and the
other ``GET`` routes are never refused, so health checks stay truthful under a flood.
:func:`read_body` then reads an admitted request's body within a size limit and a deadline; a body
too large to hold in memory (an asynchronous endpoint's, up to 1 GB) is streamed into an unnamed
temporary file as it arrives (:class:`SpooledBody`).

A few kilobytes of PNG can hold tens of megapixels, so the body size says nothing of what
decoding costs. Every full-size decode first takes its estimated bytes from one shared
:class:`MemoryGate` and waits while the images already being decoded hold too much; each image is
reduced to the model's input right after decoding, so a request never holds more than one
full-size image at a time.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from fastapi.responses import JSONResponse

from serve.errors import InsufficientStorage, Overloaded, PayloadTooLarge, RequestTimeout

# Peak bytes per decoded pixel: the decoder's own image (up to 4 bytes a pixel, as Pillow stores
# RGB), a rotated copy for EXIF orientation, and the RGB image it becomes (4 bytes a pixel).
BYTES_PER_DECODED_PIXEL = 12
# A spooled body's chunks are gathered up to this many bytes before each write to its file.
SPOOL_WRITE_BYTES = 1024 * 1024


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


class SpooledBody:
    """A request body in an unnamed temporary file: its disk space is freed when it is closed, or
    when the process ends, whatever happens to the request.

    The thread that decodes it claims it first and closes it when done; the request closes it only
    if no thread claimed it, so a file is never closed under a decoder still reading it (a file
    number reused meanwhile could be another request's)."""

    def __init__(self, directory: Path | None) -> None:
        self.file: BinaryIO = tempfile.TemporaryFile(dir=directory)
        self.size = 0
        self._claimed = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """For the decoding thread: False if the request already gave the file up."""
        with self._lock:
            if self.file.closed:
                return False
            self._claimed = True
            return True

    def release(self) -> None:
        """For the request, when it ends: close the file unless a decoding thread owns it."""
        with self._lock:
            if not self._claimed:
                self.file.close()

    def write(self, chunks: Sequence[bytes]) -> None:
        self.file.writelines(chunks)
        self.size += sum(len(chunk) for chunk in chunks)

    def finish(self, chunks: Sequence[bytes]) -> None:
        """Write the last chunks and rewind, ready to be read."""
        self.write(chunks)
        self.file.flush()
        self.file.seek(0)

    def close(self) -> None:
        self.file.close()


async def read_body(request: Request, limit: int, timeout_s: float, *, spool_above: int | None = None,
                    spool_dir: Path | None = None, limit_note: str = "") -> bytes | SpooledBody:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and
    with 408 if it has not all arrived ``timeout_s`` after the request's head.

    With ``spool_above``, a body larger than that is written to a :class:`SpooledBody` in
    ``spool_dir`` as it arrives, so no more than about that many bytes of it are ever in memory.
    ``limit_note`` ends the 413's message (what the limit is for)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes{limit_note}")
    chunks: list[bytes] = []
    held = size = 0
    spooled: SpooledBody | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes{limit_note}")
                chunks.append(chunk)
                held += len(chunk)
                if spool_above is not None and size > spool_above and held >= SPOOL_WRITE_BYTES:
                    if spooled is None:
                        spooled = SpooledBody(spool_dir)
                    await asyncio.to_thread(spooled.write, chunks)  # disk writes off the event loop
                    chunks, held = [], 0
            if spool_above is not None and size > spool_above:
                if spooled is None:
                    spooled = SpooledBody(spool_dir)
                await asyncio.to_thread(spooled.finish, chunks)
                return spooled
    except TimeoutError:
        if spooled is not None:
            spooled.close()
        # The connection stays open (closing it while the client still sends could reset it before
        # the answer is read); the server closes it if the rest of the body keeps it busy.
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s ({size} bytes came)") from None
    except OSError as error:  # after TimeoutError, which is one
        if spooled is not None:
            spooled.close()
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(f"no room for the body in the spool folder ({size} bytes came): "
                                      "free space there or point CLASSIFIER_SPOOL_DIR elsewhere") from None
        raise
    except BaseException:
        if spooled is not None:
            spooled.close()
        raise
    return b"".join(chunks)


class RequestLimit:
    """Plain ASGI middleware: at most ``limit`` ``POST`` requests in progress, the rest 503."""

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0  # read and written on the event loop only

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            refusal = Overloaded(f"{self.in_progress} requests are in progress, the most this server takes at once; "
                                 "try again shortly", headers={"Retry-After": "1"})
            await JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)(scope, receive, send)
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1
