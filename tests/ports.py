"""Sockets for tests: a free TCP port on 127.0.0.1 for servers the tests start, and reading a
raw connection to its end."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """What the peer sends until it closes the connection (b"" for a quiet close)."""
    sock.settimeout(timeout_s)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received
