"""Connection and request limits of the real server process (``python -m serve``), over raw sockets:
idle, trickling and oversized request heads, slow bodies, and floods of connections and requests."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from PIL import Image

from serve.connections import error_response
from serve.errors import TooManyConnections

from imagedata import encode
from ports import read_until_closed
from server_process import server

PNG = encode(Image.new("RGB", (40, 40), "blue"))
SLOW_POST_HEAD = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 100000\r\n\r\n")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextmanager
def connections(url: str, count: int, first_bytes: bytes = b"") -> Iterator[list[socket.socket]]:
    """``count`` open connections to the server, each having sent ``first_bytes`` (maybe nothing)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.create_connection(("127.0.0.1", port_of(url)))) for _ in range(count)]
        for sock in sockets:
            sock.sendall(first_bytes)
        yield sockets


def status_and_error(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)["error"]


def classify(url: str) -> httpx.Response:
    return httpx.post(f"{url}/invocations", content=PNG, headers={"Content-Type": "image/png"}, timeout=30)


def test_idle_and_trickling_clients_are_cut_off_while_valid_requests_are_answered(tiny_artifact: Path) -> None:
    with server(tiny_artifact, CLASSIFIER_HEADER_TIMEOUT_S="1", CLASSIFIER_BODY_TIMEOUT_S="2") as (url, _), \
            connections(url, 10) as idle, \
            connections(url, 3, b"POST /invocations HTTP/1.1\r\nHost: x\r\n") as slow_heads, \
            connections(url, 3, SLOW_POST_HEAD + b"\x89PNG") as slow_bodies:
        started = time.monotonic()
        assert classify(url).status_code == 200
        assert httpx.get(f"{url}/ping", timeout=2).status_code == 200
        for sock in idle:
            assert read_until_closed(sock, timeout_s=10) == b""  # closed without a word
        for sock in slow_heads:
            status, headers, error = status_and_error(read_until_closed(sock, timeout_s=10))
            assert (status, error["code"], headers["connection"]) == (408, "request_timeout", "close")
            assert "headers did not arrive within 1 s" in error["message"]
        for sock in slow_bodies:
            status, headers, error = status_and_error(read_until_closed(sock, timeout_s=10))
            assert (status, error["code"]) == (408, "request_timeout")
            assert "the body did not arrive within 2 s (4 bytes came)" == error["message"]
        assert time.monotonic() - started < 8
        assert classify(url).status_code == 200


def test_a_kept_alive_connection_must_send_its_next_head_in_time(tiny_artifact: Path) -> None:
    with server(tiny_artifact, CLASSIFIER_HEADER_TIMEOUT_S="1") as (url, _), connections(url, 1) as (sock,):
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /ping HTTP/1.1\r\n")  # then nothing more: uvicorn's keep-alive timer stops here
        status, _, error = status_and_error(read_until_closed(sock, timeout_s=10))
        assert (status, error["code"]) == (408, "request_timeout")


def test_an_oversized_request_head_gets_431(tiny_artifact: Path) -> None:
    with server(tiny_artifact) as (url, _), connections(url, 1) as (sock,):
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        for _ in range(40):  # 40 x 4 KB: well over the 64 KB limit
            try:
                sock.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                break
        status, headers, error = status_and_error(read_until_closed(sock, timeout_s=10))
        assert (status, error["code"]) == (431, "headers_too_large")
        assert classify(url).status_code == 200


def test_a_pipelined_oversized_head_gets_431_after_the_answer_before_it(tiny_artifact: Path) -> None:
    with server(tiny_artifact) as (url, _), connections(url, 1) as (sock,):
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\nX-Filler: ")
        for _ in range(100):  # 100 x 4 KB: over the limit even when the first read is not counted
            try:
                sock.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError):
                break
        first, _, rest = read_until_closed(sock, timeout_s=10).partition(b"HTTP/1.1 431 ")
        assert first.startswith(b"HTTP/1.1 200 ") and b'"headers_too_large"' in rest


def test_a_body_answered_before_it_is_read_is_not_taken_for_a_head(tiny_artifact: Path) -> None:
    with server(tiny_artifact, CLASSIFIER_MAX_BODY_MB="0.5", CLASSIFIER_HEADER_TIMEOUT_S="2") as (url, _), \
            connections(url, 1, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                 b"Content-Length: 1000000\r\n\r\n") as (sock,):
        for _ in range(244):  # the whole megabyte, sent after the 413 has been written
            sock.sendall(b"\0" * 4096)
        answer = read_until_closed(sock, timeout_s=10)  # then closed, once nothing more comes
        assert answer.startswith(b"HTTP/1.1 413 ") and answer.count(b"HTTP/1.1") == 1, answer


def test_connections_beyond_the_limit_get_503_and_the_server_recovers(tiny_artifact: Path) -> None:
    with server(tiny_artifact, CLASSIFIER_MAX_CONNECTIONS="20") as (url, _):
        with connections(url, 20):
            with connections(url, 1) as (refused,):
                status, headers, error = status_and_error(read_until_closed(refused, timeout_s=10))
            assert (status, error["code"], headers["retry-after"]) == (503, "too_many_connections", "1")
            assert "limit of 20 connections" in error["message"]
        deadline = time.monotonic() + 10  # the server notices the closed connections at once, but not in this thread
        while (response := classify(url)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert response.status_code == 200, response.text


def test_requests_beyond_the_concurrency_limit_get_503_before_their_body_is_read(tiny_artifact: Path) -> None:
    with server(tiny_artifact, CLASSIFIER_MAX_CONCURRENT_REQUESTS="3") as (url, _):
        with connections(url, 3, SLOW_POST_HEAD):  # three requests in progress, their bodies on the way
            deadline = time.monotonic() + 10
            while (refused := classify(url)).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            assert "3 requests are in progress" in refused.json()["error"]["message"]
            assert httpx.get(f"{url}/ping", timeout=2).status_code == 200  # health checks are never refused
        deadline = time.monotonic() + 10  # the slow clients went away: their requests end, their places free up
        while (response := classify(url)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert response.status_code == 200, response.text


def test_error_responses_are_complete_http() -> None:
    raw = error_response(TooManyConnections("why", headers={"Retry-After": "1"}))
    status, headers, error = status_and_error(raw)
    body = raw.partition(b"\r\n\r\n")[2]
    assert (status, headers["retry-after"], headers["content-length"]) == (503, "1", str(len(body)))
    assert error == {"code": "too_many_connections", "message": "why"}
