"""The memory gate: decoding holds bytes from one shared capacity and waits while it is spent."""

from __future__ import annotations

import threading
import time

import pytest

from serve.admission import MemoryGate


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
