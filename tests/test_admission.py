"""The memory gate: decoding holds bytes from one shared capacity and waits while it is spent."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from pathlib import Path

import pytest
from starlette.requests import Request

from serve.admission import MemoryGate, SpooledBody, read_body
from serve.errors import InsufficientStorage, PayloadTooLarge, RequestTimeout


def test_claims_within_the_capacity_are_held_together_and_released() -> None:
    gate = MemoryGate(100)
    with gate.hold(40), gate.hold(60):
        assert gate.held == 100
    assert gate.held == 0


def test_a_claim_that_does_not_fit_waits_until_memory_is_released() -> None:
    gate = MemoryGate(100)
    first = gate.hold(70)
    first.__enter__()
    admitted = threading.Event()

    def second() -> None:
        with gate.hold(50):
            admitted.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not admitted.wait(0.2)  # 70 + 50 > 100: still waiting
    first.__exit__(None, None, None)
    assert admitted.wait(10)
    thread.join(10)
    assert gate.held == 0


def test_a_claim_above_the_capacity_is_admitted_alone() -> None:
    gate = MemoryGate(100)
    with gate.hold(10_000):
        assert gate.held == 100


def test_a_failing_block_releases_its_claim() -> None:
    gate = MemoryGate(100)
    with pytest.raises(RuntimeError), gate.hold(80):
        raise RuntimeError("decoder failed")
    assert gate.held == 0


def test_a_large_claim_is_not_overtaken_by_small_ones_arriving_after_it() -> None:
    gate = MemoryGate(100)
    order: list[str] = []
    first = gate.hold(60)
    first.__enter__()
    large_waiting = threading.Event()

    def claim(name: str, nbytes: int, started: threading.Event | None = None) -> None:
        if started is not None:
            started.set()
        with gate.hold(nbytes):
            order.append(name)

    large = threading.Thread(target=claim, args=("large", 100, large_waiting))
    large.start()
    assert large_waiting.wait(10)
    deadline = time.monotonic() + 10
    while not gate._waiting and time.monotonic() < deadline:  # the large claim is in line
        time.sleep(0.01)
    small = threading.Thread(target=claim, args=("small", 10))
    small.start()
    small.join(0.2)
    assert order == []  # 60 + 10 would fit, but the large claim came first
    first.__exit__(None, None, None)
    large.join(10)
    small.join(10)
    assert order == ["large", "small"]


def request_sending(chunks: list[bytes], headers: dict[str, str] | None = None) -> Request:
    """A Starlette request whose body arrives in ``chunks``, as a server would deliver it."""
    pending = list(chunks)

    async def receive() -> dict:
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    raw = [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw}, receive)


def test_a_body_within_the_memory_limit_is_returned_as_bytes() -> None:
    chunks = [b"a" * 300_000, b"b" * 300_000]
    body = asyncio.run(read_body(request_sending(chunks), 10_000_000, 5, spool_above=1_000_000))
    assert body == b"".join(chunks)


def test_a_larger_body_is_written_to_a_file_as_it_arrives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [bytes([n]) * 250_000 for n in range(40)]  # 10 MB in 40 chunks
    held: list[int] = []
    original = SpooledBody.write

    def write(self: SpooledBody, pending: list[bytes]) -> None:
        held.append(sum(len(chunk) for chunk in pending))
        original(self, pending)

    monkeypatch.setattr(SpooledBody, "write", write)
    body = asyncio.run(read_body(request_sending(chunks), 20_000_000, 5, spool_above=2_000_000, spool_dir=tmp_path))
    assert isinstance(body, SpooledBody)
    try:
        assert body.size == 10_000_000 and body.file.read() == b"".join(chunks)
        assert max(held) <= 2_000_000 + 250_000  # never more than the memory limit and one chunk in memory
        assert list(tmp_path.iterdir()) == []  # the file has no name: nothing to leave behind if the process dies
    finally:
        body.close()


@pytest.mark.parametrize("headers", [{}, {"Content-Length": "2000001"}], ids=["streamed", "declared"])
def test_a_body_over_the_limit_is_refused_with_what_the_limit_is_for(headers: dict[str, str]) -> None:
    chunks = [b"x" * 500_000] * 4 + [b"x"]
    with pytest.raises(PayloadTooLarge, match="limit (is|of) 2000000 bytes for JSON$") as raised:
        asyncio.run(read_body(request_sending(chunks, headers), 2_000_000, 5, spool_above=1_000_000,
                              limit_note=" for JSON"))
    assert raised.value.status == 413


def test_a_body_above_the_memory_limit_in_one_chunk_is_spooled_too(tmp_path: Path) -> None:
    body = asyncio.run(read_body(request_sending([b"z" * 500_000]), 1_000_000, 5, spool_above=100_000,
                                 spool_dir=tmp_path))
    assert isinstance(body, SpooledBody)
    with body.file:
        assert body.file.read() == b"z" * 500_000


def test_a_full_spool_disk_is_a_507_and_a_slow_body_still_a_408(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: SpooledBody, chunks: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SpooledBody, "write", full)
    with pytest.raises(InsufficientStorage, match="no room for the body in the spool folder") as raised:
        asyncio.run(read_body(request_sending([b"x" * 2_000_000] * 2), 10_000_000, 5, spool_above=1_000_000,
                              spool_dir=tmp_path))
    assert raised.value.status == 507

    async def never_ends() -> dict:
        await asyncio.sleep(3600)
        return {}

    slow = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, never_ends)
    with pytest.raises(RequestTimeout, match="did not arrive within 0.05 s"):
        asyncio.run(read_body(slow, 1_000, 0.05))
