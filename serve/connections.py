"""Connection limits: what a client may hold before the app sees a request.

uvicorn's HTTP protocol waits for a request head without a deadline and without a size limit,
and takes any number of connections. :class:`GuardedHttpProtocol` adds the three bounds that
servers facing the open internet keep (nginx's ``client_header_timeout``,
``large_client_header_buffers`` and ``worker_connections``):

* a request head, once begun, must be complete within ``head_timeout_s`` (else 408), and a
  connection with nothing in progress (just opened, or answered and kept alive) is closed after
  ``head_timeout_s`` of waiting for its next request, so an idle client, or one still sending the
  rest of a body it was answered before, cannot hold a connection for good;
* a request head larger than ``max_head_bytes`` gets 431 (the parser says when a head begins,
  not where: a head that begins in the same read as the end of the request before it, pipelined,
  is counted from the next read, so its bound is the limit plus one read);
* beyond ``max_connections`` open connections, a new one gets 503 with ``Retry-After``, so the
  server's memory and file descriptors stay bounded.

Each answer is the app's JSON error body, written directly (there is no request to route). The
connection then lingers for up to ``LINGER_S``, its sending side closed and whatever still
arrives read and dropped, so that closing it does not reset it before the client has read the
answer. The body's own deadline is the app's (see :func:`serve.admission.read_body`), and so is
the limit on requests in progress (:class:`serve.admission.RequestLimit`).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.errors import HeadersTooLarge, RequestTimeout, ServingError, TooManyConnections

logger = logging.getLogger(__name__)
LINGER_S = 2.0
LOG_EVERY_S = 10.0  # refusals are logged at most this often (a flood would flood the log)


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout_s: float = 10.0
    max_head_bytes: int = 64 * 1024
    max_connections: int = 1000


class Phase(enum.Enum):
    WAITING = "waiting"  # for a request to begin
    HEAD = "head"  # a request line and headers are arriving
    BODY = "body"  # the head is complete; its body (if any) follows


def error_response(error: ServingError) -> bytes:
    """A complete HTTP/1.1 response carrying ``error``'s JSON body and headers, closing the connection."""
    body = json.dumps(error.body()).encode()
    head = [f"HTTP/1.1 {error.status.value} {error.status.phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{name.lower()}: {value}" for name, value in error.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline, a head size limit and a
    connection limit."""

    # Set once per process by configure(), before the server starts: uvicorn builds the protocol
    # from its class, which reaches worker processes by name, so the limits travel as the class's.
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _refusals: ClassVar[int] = 0
    _logged_at: ClassVar[float] = -LOG_EVERY_S

    _phase = Phase.WAITING
    _timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _completed = False  # a request ended in the data being parsed now
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(TooManyConnections(f"the server holds its limit of {self.limits.max_connections} "
                                            "connections; try again shortly", headers={"Retry-After": "1"}))
            return
        self._start_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: dropped
        before, self._completed = self._phase, False
        super().data_received(data)
        # All of this data belongs to a head still incomplete when one was already arriving, or
        # when nothing was in progress and no request ended in it (so the head began it).
        if self._phase is Phase.HEAD and (before is Phase.HEAD or (before is Phase.WAITING and not self._completed)):
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(HeadersTooLarge(f"the request line and headers exceed {self.limits.max_head_bytes} bytes"))

    def on_message_begin(self) -> None:
        self._phase, self._head_bytes = Phase.HEAD, 0
        self._start_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._phase = Phase.BODY
        self._stop_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase, self._completed = Phase.WAITING, True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Kept alive with nothing pipelined (uvicorn then arms its keep-alive timer, which any byte
        # cancels): the next request, or the rest of a body answered early, gets head_timeout_s.
        if self.timeout_keep_alive_task is not None and self._phase is not Phase.HEAD:
            self._start_timer()

    def _start_timer(self) -> None:
        self._stop_timer()
        self._timer = self.loop.call_later(self.limits.head_timeout_s, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase is Phase.HEAD:
            self._refuse(RequestTimeout(f"the request headers did not arrive within {self.limits.head_timeout_s:g} s"))
        else:  # nothing in progress: closed without a word, as a keep-alive timeout is
            self.transport.close()

    def _refuse(self, error: ServingError) -> None:
        self._stop_timer()
        self._unset_keepalive_if_required()
        self._refused = True
        self._log_refusal(error)
        self.transport.write(error_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _log_refusal(self, error: ServingError) -> None:
        cls = type(self)
        cls._refusals += 1
        now = time.monotonic()
        if now - cls._logged_at >= LOG_EVERY_S:
            logger.warning("refused a connection from %s: %d %s (%d refused so far)",
                           self.client and self.client[0], error.status.value, error.code, cls._refusals)
            cls._logged_at = now


def configure(limits: ConnectionLimits) -> type[GuardedHttpProtocol]:
    """Set this process's connection limits; the protocol class to give uvicorn (``http=``)."""
    GuardedHttpProtocol.limits = limits
    return GuardedHttpProtocol
