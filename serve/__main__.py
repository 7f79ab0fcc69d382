"""Serve a model: ``python -m serve`` or ``docker run IMAGE serve`` (port 8080 by default).

SageMaker asks a container to accept connections within 250 ms of its start. The socket is
bound and listening before anything slow is imported (PyTorch alone takes seconds): from then on
the kernel accepts connections, which wait in the backlog until :mod:`serve.server` answers them.
With ``SAGEMAKER_MODEL_SERVER_WORKERS`` > 1, uvicorn's worker processes share the socket; they
share their metrics through a private folder under the temporary folder (``TMPDIR``), so
``/metrics`` reports every worker, whichever one answers. The exit status is 0 when the server was
stopped (SIGTERM, SIGINT), 1 when the model failed to load (see ``CLASSIFIER_FAILED_EXIT_S``) and
2 when the settings or the port cannot be used.
"""

from __future__ import annotations

import os
import socket
import sys

from serve.settings import ConfigError, Settings

LISTEN_BACKLOG = 2048  # uvicorn's default


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening: from here the kernel accepts connections (into
    the backlog) while the model loads. SageMaker asks for accepted connections within 250 ms of
    the container's start, so this comes before anything slow (PyTorch's import alone takes
    seconds)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)  # for the worker processes
    return sock


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    from serve.server import run

    return run(settings, sock)


if __name__ == "__main__":
    sys.exit(main())
