"""A closed-loop HTTP load generator: N clients, each sending its next request when the last is answered.

Each request carries one photo, taken round-robin from a fixed list. The first ``warmup_s``
seconds are not counted; after that, every request answered within the next ``duration_s`` seconds
counts, and its latency is kept. No new request starts after the window closes, and the ones in
flight are let finish (uncounted), so the server is idle again when the next measurement starts.
Traffic goes to the URL given, which the caller keeps on 127.0.0.1.

The client is aiohttp: the load generator shares the machine's cores with the server under test,
and aiohttp spends a third of the CPU time per request that httpx does (0.37 against 1.15 ms at
concurrency 8 here), so less of the measurement is the client's own cost.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

# "decode;dur=1.23, queue;dur=4.56, inference;dur=7.89;desc="batch of 8"" (our server's header)
SERVER_TIMING = re.compile(r'(\w+);dur=([0-9.]+)(?:;desc="batch of (\d+)")?')


@dataclass
class LoadResult:
    """What one closed-loop run saw in its measurement window."""

    concurrency: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_example: str = ""
    # Our server's Server-Timing plus the client's "total", in ms, one dict per counted request
    # (empty for servers that send no Server-Timing).
    timings: list[dict[str, float]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.duration_s


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``{"decode": ms, "queue": ms, "inference": ms, "batch": n}`` from a Server-Timing header."""
    parsed: dict[str, float] = {}
    for name, duration, batch in SERVER_TIMING.findall(header or ""):
        parsed[name] = float(duration)
        if batch:
            parsed["batch"] = float(batch)
    return parsed


async def closed_loop(url: str, bodies: Sequence[bytes], *, concurrency: int, warmup_s: float, duration_s: float,
                      max_requests: int, content_type: str = "image/jpeg", timeout_s: float = 60.0) -> LoadResult:
    """Run ``concurrency`` clients against ``url`` for ``warmup_s + duration_s`` seconds (bounded count)."""
    result = LoadResult(concurrency, duration_s)
    sequence = itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as client:
        window_opens = time.perf_counter() + warmup_s
        window_closes = window_opens + duration_s

        async def client_loop() -> None:
            while time.perf_counter() < window_closes:
                number = next(sequence)
                if number >= max_requests:
                    return
                started = time.perf_counter()
                server_timing = None
                try:
                    async with client.post(url, data=bodies[number % len(bodies)],
                                           headers={"Content-Type": content_type}) as response:
                        status, text = response.status, await response.text()
                        server_timing = response.headers.get("Server-Timing")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                finished = time.perf_counter()
                if not window_opens <= finished <= window_closes:
                    continue
                if status != 200:
                    result.errors += 1
                    result.error_example = result.error_example or f"{status} {text[:200]}"
                    continue
                result.latencies_s.append(finished - started)
                if server_timing is not None:
                    result.timings.append(parse_server_timing(server_timing) | {"total": (finished - started) * 1000})

        await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(concurrency))),
                               timeout=warmup_s + duration_s + timeout_s + 5)
    return result


def run_load(url: str, bodies: Sequence[bytes], *, concurrency: int, warmup_s: float, duration_s: float,
             max_requests: int = 20_000) -> LoadResult:
    """:func:`closed_loop` from synchronous code."""
    return asyncio.run(closed_loop(url, bodies, concurrency=concurrency, warmup_s=warmup_s,
                                   duration_s=duration_s, max_requests=max_requests))
