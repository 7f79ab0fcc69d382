"""Sockets for tests: a free TCP port on 127.0.0.1 for servers the tests start, and reading a
raw connection to its end."""

from __future__ import annotations

import socket

from deploy.host import free_port  # noqa: F401 - one definition for the project


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """What the peer sends until it closes the connection (b"" for a quiet close)."""
    sock.settimeout(timeout_s)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received
