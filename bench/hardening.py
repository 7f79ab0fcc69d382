"""Hardening benchmark: the real CPU image under overload, a long mixed soak and a hostile corpus.

    export CLASSIFIER_IMAGE_CPU=$(container/build-image.sh cpu)
    .venv/bin/python bench/hardening.py                    # the full run: about 15 minutes
    .venv/bin/python bench/hardening.py --overload-s 10 --soak-s 30 --hostile-s 15 \\
        --output /tmp/hardening-smoke.json                 # a smoke run of every code path: about 3 minutes

Three figures, each from a fresh container of the image (``docker run IMAGE serve``, default settings):

1. Overload. A closed loop at the server's natural concurrency (8 clients, as in serve_load) finds
   the sustainable throughput; then requests for one small JPEG arrive open-loop at 4x that rate
   for 60 s. Open loop, because a closed loop cannot overload a server: each client waits for its
   answer, so the offered load falls to whatever the server manages, and 4x the clients only makes
   a longer queue (32 clients never fill the server's 256-image queue). Independent callers, which
   is what an endpoint has, keep arriving whatever the latency. Counted: admitted requests (200) and
   their latency against the server's 55 s deadline, 503s and whether each carried Retry-After,
   other statuses, client timeouts (the client waits 10 s longer than the server) and connection
   errors.
2. Soak. 16 clients for 10 minutes, closed loop, sending a fixed mix of valid JPEG/PNG/JSON requests,
   invalid bodies and hostile ones (see :func:`corpus`). The container's cgroup memory is sampled every
   5 s: RSS and cgroup usage at the end of the first two minutes (the warm-up, at most a quarter of
   the soak: under the hostile mix the decoders' memory reaches its high-water mark within the
   second minute) against the end of the load, the growth of the floor (see :func:`growth`, goal
   under 5 %) and the slope;
   status counts per kind (5xx must be none); the valid requests' p50/p99 per minute.
3. Peak memory under the hostile corpus alone, with ``--memory 2g``: after a warm-up with valid
   requests, the cgroup's peak counter is reset (cgroup v1, from the host) and the hostile bodies
   are sent by 16 clients for 60 s; the peak against the idle memory after warm-up.

Requests go to the container's own bridge-network address (as SageMaker reaches a container), or
to its published 127.0.0.1 port (``--published-port``, or when the bridge is not reachable from
here); to no other host. Every status is counted as it comes: the figures hold whatever the
server answers. Writes ``--output`` (JSON: every count, the settings, the image, the date) and a
markdown summary beside it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT)]

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from loadgen import closed_loop  # noqa: E402
from PIL import Image  # noqa: E402
from serve_load import image_under_test, machine, percentile, photo_bodies, sigterm_as_interrupt  # noqa: E402

from deploy.host import (  # noqa: E402
    Served,
    direct_url,
    docker,
    encode,  # noqa: E402
    serving,
)
from serve.settings import MEGABYTE, REALTIME_TIMEOUT_S  # noqa: E402

RESULTS = BENCH / "results"
CLIENT_TIMEOUT_S = REALTIME_TIMEOUT_S + 10  # longer than the server's own deadline, so its answer is seen
SIDE = 6324  # SIDE * SIDE is just under the server's default 40-megapixel limit for one image
DEFAULT_BODY_LIMIT = 6 * MEGABYTE  # SAGEMAKER_MAX_PAYLOAD_IN_MB's default


# --- the corpus -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One kind of request: its body, content type, and how often it appears in a mix."""

    kind: str
    group: str  # "valid", "invalid" or "hostile"
    content: bytes
    content_type: str
    weight: int = 1
    chunked: bool = False  # sent without a Content-Length, in 64 KB chunks

    def data(self) -> bytes | AsyncIterator[bytes]:
        return chunks(self.content) if self.chunked else self.content


async def chunks(content: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start:start + size]


def instances(image: bytes, count: int) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}] * count}).encode()


def small_jpeg() -> bytes:
    """The cat photo at 336x224: a typical small request."""
    from skimage import data

    return encode(Image.fromarray(data.chelsea()).resize((336, 224)), "JPEG", quality=90)


def npy_header_claiming(shape: tuple[int, ...]) -> bytes:
    """A .npy file whose header promises ``shape`` float32s and holds none of them."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def corpus() -> list[Body]:
    """Valid, invalid and hostile requests, with their weights in the soak's mix.

    The hostile ones are the bodies of tests/test_container_hardening.py and their kin: PNGs of a
    few kilobytes that decode to 40 megapixels (alone, or 32 in one JSON request), one over the pixel
    limit, JSON nested 100,000 deep, a .npy header promising 600 GB, bodies over the 6 MB limit
    with and without a Content-Length. The two that decode (the PNGs at the limit) cost seconds of
    CPU each, so they are rarer than the rest."""
    rng = random.Random(0)
    jpeg, photos = small_jpeg(), photo_bodies()
    png = encode(Image.open(io.BytesIO(jpeg)), "PNG")
    one_bit = encode(Image.new("1", (SIDE, SIDE)), "PNG")  # about 5 KB, 120 MB as RGB
    sixteen_bit = encode(Image.new("I;16", (SIDE, SIDE)), "PNG")  # about 80 KB
    garbage = rng.randbytes(20_000)
    oversized = rng.randbytes(DEFAULT_BODY_LIMIT + MEGABYTE)
    depth = 100_000
    return [
        Body("small JPEG 336x224", "valid", jpeg, "image/jpeg", weight=40),
        Body("small PNG 336x224", "valid", png, "image/png", weight=8),
        *(Body(f"photo JPEG {i + 1}", "valid", photo, "image/jpeg", weight=2) for i, photo in enumerate(photos)),
        Body("JSON, 2 JPEG instances", "valid", instances(jpeg, 2), "application/json", weight=4),
        Body("garbage as image/jpeg", "invalid", garbage, "image/jpeg", weight=2),
        Body("garbage as image/png", "invalid", garbage, "image/png", weight=2),
        Body("empty body", "invalid", b"", "image/jpeg"),
        Body("malformed JSON", "invalid", b'{"instances": [{"b64": "', "application/json", weight=2),
        Body("bad base64 in JSON", "invalid", b'{"instances": [{"b64": "!!not base64!!"}]}', "application/json"),
        Body("JPEG as text/plain", "invalid", jpeg, "text/plain", weight=2),
        Body("truncated JPEG", "invalid", photos[0][:len(photos[0]) // 2], "image/jpeg", weight=2),
        Body("truncated PNG", "invalid", png[:len(png) // 2], "image/png", weight=2),
        Body("1-bit PNG at the pixel limit x32 in JSON", "hostile", instances(one_bit, 32), "application/json", weight=2),
        Body("1-bit PNG at the pixel limit", "hostile", one_bit, "image/png"),
        Body("16-bit PNG at the pixel limit", "hostile", sixteen_bit, "image/png"),
        Body("1-bit PNG over the pixel limit", "hostile", encode(Image.new("1", (8000, 8000)), "PNG"), "image/png",
             weight=2),
        Body("JSON nested 100,000 deep", "hostile", b'{"instances": ' + b"[" * depth + b"]" * depth + b"}",
             "application/json", weight=2),
        Body(".npy header promising 600 GB", "hostile", npy_header_claiming((1_000_000, 3, 224, 224)),
             "application/x-npy", weight=2),
        Body("7 MB body, Content-Length", "hostile", oversized, "image/jpeg", weight=2),
        Body("7 MB body, chunked", "hostile", oversized, "image/jpeg", weight=2, chunked=True),
    ]


def mix(bodies: Sequence[Body], seed: int = 0) -> list[Body]:
    """Each body ``weight`` times, shuffled once: the order every run of the mix follows."""
    sequence = [body for body in bodies for _ in range(body.weight)]
    random.Random(seed).shuffle(sequence)
    return sequence


# --- sending ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as the client saw it. ``status`` 0: no answer (``error`` says why)."""

    kind: str
    group: str
    status: int
    sent_at_s: float  # since the run began
    latency_s: float
    retry_after: bool = False
    error: str = ""  # "timeout", or "connection: <exception>"
    detail: str = ""  # the start of the body of a 5xx other than 503, or the exception's message


def session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S))


async def send(client: aiohttp.ClientSession, url: str, body: Body, origin: float) -> Outcome:
    started = time.perf_counter()
    outcome = Outcome(body.kind, body.group, 0, started - origin, 0.0)
    try:
        async with client.post(url, data=body.data(), headers={"Content-Type": body.content_type}) as response:
            text = await response.text(errors="replace")
            outcome.status, outcome.retry_after = response.status, "Retry-After" in response.headers
            if response.status >= 500 and response.status != 503:
                outcome.detail = text[:300]
    except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
        outcome.error, outcome.detail = "timeout", str(exc)[:300]
    except (aiohttp.ClientError, OSError) as exc:
        outcome.error, outcome.detail = f"connection: {type(exc).__name__}", str(exc)[:300]
    outcome.latency_s = time.perf_counter() - started
    return outcome


@dataclass
class OpenLoopRun:
    outcomes: list[Outcome] = field(default_factory=list)
    scheduled: int = 0
    not_sent: int = 0  # arrivals dropped by the client because max_in_flight were already waiting
    lag_s: list[float] = field(default_factory=list)  # how late each arrival left the client
    unfinished: int = 0  # still unanswered when the run gave up on them


async def open_loop(url: str, body: Body, *, rate: float, duration_s: float, max_in_flight: int) -> OpenLoopRun:
    """Requests leave at ``rate`` per second, evenly spaced, whether or not earlier ones were answered."""
    run = OpenLoopRun(scheduled=int(rate * duration_s))
    pending: set[asyncio.Task[Outcome]] = set()

    def finished(task: asyncio.Task[Outcome]) -> None:
        pending.discard(task)
        if not task.cancelled():
            run.outcomes.append(task.result())

    async with session(max_in_flight) as client:
        origin = time.perf_counter()
        for number in range(run.scheduled):
            due = origin + number / rate
            if (ahead := due - time.perf_counter()) > 0:
                await asyncio.sleep(ahead)
            run.lag_s.append(time.perf_counter() - due)
            if len(pending) >= max_in_flight:
                run.not_sent += 1
                continue
            task = asyncio.create_task(send(client, url, body, origin))
            pending.add(task)
            task.add_done_callback(finished)
        if pending:
            _, still = await asyncio.wait(set(pending), timeout=CLIENT_TIMEOUT_S + 5)
            run.unfinished = len(still)
            for task in still:
                task.cancel()
    return run


async def mixed_closed_loop(url: str, sequence: Sequence[Body], *, concurrency: int, duration_s: float,
                            max_requests: int) -> list[Outcome]:
    """``concurrency`` clients, each sending the next body of ``sequence`` (round robin) once its last
    was answered, until ``duration_s`` has passed or ``max_requests`` were sent. Every request counts."""
    outcomes: list[Outcome] = []
    numbers = itertools.count()
    async with session(concurrency) as client:
        origin = time.perf_counter()

        async def one_client() -> None:
            while time.perf_counter() - origin < duration_s and (number := next(numbers)) < max_requests:
                outcomes.append(await send(client, url, sequence[number % len(sequence)], origin))

        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(concurrency))),
                               timeout=duration_s + CLIENT_TIMEOUT_S + 5)
    return outcomes


# --- the container's memory -------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    at_s: float
    current: int  # the cgroup's usage: the processes' memory and the page cache charged to it
    rss: int | None  # anonymous memory only (v1 total_rss, v2 anon): what a leak grows
    peak: int | None  # the kernel's high-water mark of ``current`` (since start or the last reset)


class CgroupMemory:
    """One container's memory cgroup, v1 or v2: read from the host's /sys/fs/cgroup when this
    machine is the Docker host, else through ``docker exec`` (slower; no peak reset)."""

    V1 = {"current": "memory.usage_in_bytes", "peak": "memory.max_usage_in_bytes", "rss": "total_rss"}
    V2 = {"current": "memory.current", "peak": "memory.peak", "rss": "anon"}

    def __init__(self, container: str) -> None:
        self.container = container
        self.host_dir = self._on_host(container)
        if self.host_dir is not None:
            self.files = self.V1 if self.host_dir.is_relative_to("/sys/fs/cgroup/memory") else self.V2
        else:
            v2 = docker("exec", container, "test", "-f", "/sys/fs/cgroup/memory.current", check=False).returncode == 0
            self.files = self.V2 if v2 else self.V1
        self.inside_dir = "/sys/fs/cgroup" if self.files is self.V2 else "/sys/fs/cgroup/memory"

    @staticmethod
    def _on_host(container: str) -> Path | None:
        """The container's memory cgroup folder on this machine, if this machine is its Docker host."""
        pid = docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
        membership = Path(f"/proc/{pid}/cgroup")
        entries = [line.split(":", 2) for line in membership.read_text().splitlines()] if membership.exists() else []
        # "4:memory:/docker/<id>" on cgroup v1 (also on hybrid hosts), "0::/system.slice/docker-<id>.scope" on v2
        v1 = [path for _, controllers, path in entries if "memory" in controllers.split(",")]
        v2 = [path for hierarchy, controllers, path in entries if hierarchy == "0" and not controllers]
        if v1:
            folder, current = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/"), "memory.usage_in_bytes"
        elif v2:
            folder, current = Path("/sys/fs/cgroup") / v2[0].lstrip("/"), "memory.current"
        else:
            return None
        # The same pid on another machine's Docker host would be some other process here.
        return folder if container in str(folder) and (folder / current).exists() else None

    @property
    def source(self) -> str:
        version = "v1" if self.files is self.V1 else "v2"
        return f"cgroup {version}, " + (f"host {self.host_dir}" if self.host_dir else f"docker exec {self.inside_dir}")

    def _read(self) -> dict[str, str]:
        names = (self.files["current"], self.files["peak"], "memory.stat")
        if self.host_dir is not None:
            return {name: (self.host_dir / name).read_text() for name in names if (self.host_dir / name).exists()}
        script = "; ".join(f'echo "== {name}"; cat {self.inside_dir}/{name} 2>/dev/null' for name in names)
        output = docker("exec", self.container, "sh", "-c", script, timeout=30).stdout
        return {part.split("\n", 1)[0].strip(): part.split("\n", 1)[1] if "\n" in part else ""
                for part in output.split("== ")[1:]}

    def sample(self, origin: float) -> MemorySample:
        files = self._read()
        stat = dict(line.split() for line in files.get("memory.stat", "").splitlines() if len(line.split()) == 2)
        peak = files.get(self.files["peak"], "").strip()
        rss = stat.get(self.files["rss"])
        return MemorySample(round(time.monotonic() - origin, 2), int(files[self.files["current"]]),
                            int(rss) if rss else None, int(peak) if peak else None)

    def reset_peak(self) -> bool:
        """Start the peak counter afresh (cgroup v1 from the host; v2 resets only per open file)."""
        if self.host_dir is None or self.files is not self.V1:
            return False
        (self.host_dir / self.files["peak"]).write_text("0")
        return True


@contextmanager
def sampling(memory: CgroupMemory, interval_s: float, origin: float) -> Iterator[list[MemorySample]]:
    """Samples of ``memory`` every ``interval_s`` while the block runs (one at the start, one at the end)."""
    samples = [memory.sample(origin)]
    stop = threading.Event()

    def take() -> bool:
        try:
            samples.append(memory.sample(origin))
        except (OSError, ValueError, KeyError, AssertionError, subprocess.SubprocessError) as exc:
            print(f"memory sampling stopped: {type(exc).__name__}: {exc}", flush=True)  # e.g. the container died
            return False
        return True

    def run() -> None:
        while not stop.wait(interval_s) and take():
            pass

    sampler = threading.Thread(target=run, name="memory-sampler", daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join(timeout=60)
        take()


# --- the figures ------------------------------------------------------------------------------------


def target_url(served: Served, published_port: bool) -> tuple[str, str]:
    """The container's URL and how it is reached (see the module docstring)."""
    direct = None if published_port else direct_url(served.container)
    return (direct, "container address") if direct else (served.url, "published 127.0.0.1 port")


def container_state(served: Served, url: str) -> dict[str, Any]:
    inspected = json.loads(docker("inspect", "-f", "{{json .State}}", served.container).stdout)
    try:
        ping = httpx.get(f"{url}/ping", timeout=10).status_code
    except httpx.TransportError as exc:
        ping = f"{type(exc).__name__}: {exc}"
    return {"running": inspected["Running"], "oom_killed": inspected["OOMKilled"],
            "exit_code": inspected["ExitCode"], "ping": ping}


def milliseconds(seconds: Sequence[float]) -> dict[str, float]:
    values = [s * 1000 for s in seconds]
    return {"p50": round(percentile(values, 50), 1), "p90": round(percentile(values, 90), 1),
            "p99": round(percentile(values, 99), 1), "max": round(max(values), 1) if values else float("nan")}


def tally(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Statuses and failures, counted."""
    answered = [o for o in outcomes if o.status]
    unavailable = [o for o in answered if o.status == 503]
    other_5xx = [o for o in answered if o.status >= 500 and o.status != 503]
    failures = Counter(o.error for o in outcomes if o.error)
    examples = {}
    for outcome in (*other_5xx, *(o for o in outcomes if o.error)):
        examples.setdefault(outcome.error or str(outcome.status), f"{outcome.kind}: {outcome.detail}")
    return {
        "requests": len(outcomes),
        "statuses": dict(sorted(Counter(str(o.status) for o in answered).items())),
        "503": len(unavailable), "503_with_retry_after": sum(o.retry_after for o in unavailable),
        "other_5xx": len(other_5xx),
        "client_timeouts": failures.pop("timeout", 0),
        "connection_errors": sum(failures.values()),
        "failure_examples": examples,
    }


def overload(image: str, args: argparse.Namespace, body: Body) -> dict[str, Any]:
    with serving(image) as served:
        url, reached = target_url(served, args.published_port)
        calibration = asyncio.run(closed_loop(f"{url}/invocations", [body.content], concurrency=args.natural_concurrency,
                                              warmup_s=5, duration_s=args.calibrate_s, max_requests=100_000,
                                              timeout_s=CLIENT_TIMEOUT_S))
        if calibration.errors or not calibration.latencies_s:
            raise RuntimeError(f"the calibration run failed: {calibration.errors} errors, e.g. {calibration.error_example}")
        rate = args.overload_rate or args.overload_factor * calibration.throughput
        print(f"overload: sustainable {calibration.throughput:.1f}/s at c={args.natural_concurrency}; "
              f"offering {rate:.1f}/s open-loop for {args.overload_s:g} s", flush=True)
        run = asyncio.run(open_loop(f"{url}/invocations", body, rate=rate, duration_s=args.overload_s,
                                    max_in_flight=args.max_in_flight))
        state = container_state(served, url)
    admitted = [o for o in run.outcomes if o.status == 200]
    refused = [o for o in run.outcomes if o.status == 503]
    return {
        "reached_at": reached, "body": f"{body.kind}, {len(body.content)} bytes",
        "calibration": {"concurrency": args.natural_concurrency, "duration_s": args.calibrate_s,
                        "throughput_per_s": round(calibration.throughput, 2),
                        "latency_ms": milliseconds(calibration.latencies_s)},
        "offered_rate_per_s": round(rate, 2), "duration_s": args.overload_s, "scheduled": run.scheduled,
        "not_sent_client_cap": run.not_sent, "max_in_flight": args.max_in_flight, "unfinished": run.unfinished,
        "client_lag_ms": {"p99": round(percentile([s * 1000 for s in run.lag_s], 99), 1),
                          "max": round(max(run.lag_s, default=0) * 1000, 1)},
        "deadline_s": REALTIME_TIMEOUT_S, "client_timeout_s": CLIENT_TIMEOUT_S,
        "admitted": len(admitted), "admitted_per_s": round(len(admitted) / args.overload_s, 2),
        "admitted_latency_ms": milliseconds([o.latency_s for o in admitted]),
        "admitted_over_deadline": sum(o.latency_s > REALTIME_TIMEOUT_S for o in admitted),
        "refused_latency_ms": milliseconds([o.latency_s for o in refused]),
        **tally(run.outcomes), "container_after": state,
    }


def growth(samples: Sequence[MemorySample], warmup_s: float, duration_s: float, key: str) -> dict[str, Any]:
    """``key`` (current or rss) after warm-up against the end of the load, and the slope in between.

    A request for a 40-megapixel PNG holds hundreds of megabytes for a second or two, so single
    readings swing with what is in flight; the floor (the lowest reading) of the first minute after
    warm-up against the floor of the last minute is what a leak would raise."""
    loaded = [s for s in samples if warmup_s <= s.at_s <= duration_s and getattr(s, key) is not None]
    if len(loaded) < 2:
        return {}
    window = min(60.0, (duration_s - warmup_s) / 2)
    first = min(getattr(s, key) for s in loaded if s.at_s <= warmup_s + window)
    last = min(getattr(s, key) for s in loaded if s.at_s >= duration_s - window)
    slope = np.polyfit([s.at_s / 60 for s in loaded], [getattr(s, key) / MEGABYTE for s in loaded], 1)[0]
    return {"after_warmup_mb": round(getattr(loaded[0], key) / MEGABYTE, 1),
            "end_mb": round(getattr(loaded[-1], key) / MEGABYTE, 1),
            "after_load_mb": round(getattr(samples[-1], key) / MEGABYTE, 1),
            "window_s": window, "floor_after_warmup_mb": round(first / MEGABYTE, 1),
            "floor_end_mb": round(last / MEGABYTE, 1), "floor_growth_pct": round((last - first) / first * 100, 2),
            "slope_mb_per_min": round(float(slope), 2)}


def per_minute(outcomes: Sequence[Outcome], samples: Sequence[MemorySample]) -> list[dict[str, Any]]:
    """The valid requests answered 200, by the minute they were sent in, and the RSS range in that minute."""
    minutes: dict[int, list[float]] = {}
    for outcome in outcomes:
        if outcome.group == "valid" and outcome.status == 200:
            minutes.setdefault(int(outcome.sent_at_s // 60), []).append(outcome.latency_s)
    rows = []
    for minute, latencies in sorted(minutes.items()):
        rss = [s.rss or s.current for s in samples if minute * 60 <= s.at_s < (minute + 1) * 60]
        rows.append({"minute": minute + 1, "requests": len(latencies), **milliseconds(latencies),
                     "rss_min_mb": round(min(rss) / MEGABYTE) if rss else None,
                     "rss_max_mb": round(max(rss) / MEGABYTE) if rss else None})
    return rows


def by_kind(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        kinds.setdefault(outcome.kind, []).append(outcome)
    return {kind: {"group": group[0].group,
                   "statuses": dict(Counter(str(o.status or o.error) for o in group)),
                   "latency_ms": {key: value for key, value in milliseconds([o.latency_s for o in group]).items()
                                  if key in ("p50", "max")}}
            for kind, group in kinds.items()}


def soak(image: str, args: argparse.Namespace, bodies: list[Body]) -> dict[str, Any]:
    warmup_s = min(args.soak_warmup_s, args.soak_s / 4)
    sequence = mix(bodies)
    with serving(image) as served:
        url, reached = target_url(served, args.published_port)
        memory = CgroupMemory(served.container)
        print(f"soak: {args.soak_s:g} s at c={args.soak_concurrency}, memory from {memory.source}", flush=True)
        origin = time.monotonic()
        with sampling(memory, args.sample_s, origin) as samples:
            outcomes = asyncio.run(mixed_closed_loop(f"{url}/invocations", sequence, concurrency=args.soak_concurrency,
                                                     duration_s=args.soak_s, max_requests=args.soak_requests))
        state = container_state(served, url)
    minutes = per_minute(outcomes, samples)
    settled = [row["p99"] for row in minutes[1:]] or [row["p99"] for row in minutes]
    return {
        "reached_at": reached, "concurrency": args.soak_concurrency, "duration_s": args.soak_s, "warmup_s": warmup_s,
        "mix": {body.kind: body.weight for body in bodies}, "memory_source": memory.source,
        **tally(outcomes), "5xx": sum(o.status >= 500 for o in outcomes),
        "groups": {group: dict(Counter(str(o.status or o.error) for o in outcomes if o.group == group))
                   for group in ("valid", "invalid", "hostile")},
        "kinds": by_kind(outcomes),
        "valid_per_minute": minutes,
        "valid_p99_spread": round(max(settled) / min(settled), 2) if settled else None,
        "memory": {"rss": growth(samples, warmup_s, args.soak_s, "rss"),
                   "current": growth(samples, warmup_s, args.soak_s, "current"),
                   "peak_mb": round(max(s.peak or 0 for s in samples) / MEGABYTE, 1),
                   "samples": [asdict(s) for s in samples]},
        "container_after": state,
    }


def hostile_peak(image: str, args: argparse.Namespace, valid: list[Body], hostile: list[Body]) -> dict[str, Any]:
    with serving(image, "--memory", args.memory_limit) as served:
        url, reached = target_url(served, args.published_port)
        memory = CgroupMemory(served.container)
        asyncio.run(mixed_closed_loop(f"{url}/invocations", mix(valid), concurrency=args.soak_concurrency,
                                      duration_s=args.hostile_warmup_s, max_requests=10_000))
        origin = time.monotonic()
        idle = memory.sample(origin)
        reset = memory.reset_peak()
        print(f"hostile: {args.hostile_s:g} s at c={args.soak_concurrency} under --memory {args.memory_limit}; "
              f"idle {idle.current / MEGABYTE:.0f} MB; memory from {memory.source}", flush=True)
        with sampling(memory, args.fast_sample_s if memory.host_dir else args.sample_s, origin) as samples:
            outcomes = asyncio.run(mixed_closed_loop(f"{url}/invocations", mix(hostile), concurrency=args.soak_concurrency,
                                                     duration_s=args.hostile_s, max_requests=args.hostile_requests))
        state = container_state(served, url)
    peak = max((s.peak for s in samples if s.peak is not None), default=None)
    sampled_max = max(s.current for s in samples)
    return {
        "reached_at": reached, "memory_limit": args.memory_limit, "concurrency": args.soak_concurrency,
        "duration_s": args.hostile_s, "warmup_s": args.hostile_warmup_s, "memory_source": memory.source,
        "idle_mb": round(idle.current / MEGABYTE, 1), "idle_rss_mb": round((idle.rss or 0) / MEGABYTE, 1),
        "peak_reset_before": reset,
        "peak_mb": round(peak / MEGABYTE, 1) if peak else None,
        "peak_meaning": "since the reset before the hostile run" if reset else "since the container started",
        "sampled_max_mb": round(sampled_max / MEGABYTE, 1),
        "sampled_max_rss_mb": round(max(s.rss or 0 for s in samples) / MEGABYTE, 1),
        "samples": len(samples),
        **tally(outcomes), "5xx": sum(o.status >= 500 for o in outcomes),
        "kinds": by_kind(outcomes), "container_after": state,
    }


# --- goals and output -------------------------------------------------------------------------------


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures the server should reach, each with its value and whether it was met."""
    checks = []

    def check(figure: str, goal: str, value: str, met: bool) -> None:
        checks.append({"figure": figure, "goal": goal, "value": value, "met": bool(met)})

    if over := result.get("overload"):
        answered_other = sum(n for status, n in over["statuses"].items() if status not in ("200", "503"))
        check("overload", "every admitted request answered within the deadline",
              f"{over['admitted_over_deadline']} of {over['admitted']} over {over['deadline_s']:g} s "
              f"(max {over['admitted_latency_ms']['max']:.0f} ms)", over["admitted_over_deadline"] == 0)
        check("overload", "every 503 carries Retry-After", f"{over['503_with_retry_after']} of {over['503']}",
              over["503_with_retry_after"] == over["503"])
        check("overload", "the rest 503: no other status, no lost request",
              f"{answered_other} other statuses, {over['not_sent_client_cap']} not sent, {over['unfinished']} unfinished",
              answered_other == 0 and over["not_sent_client_cap"] == 0 and over["unfinished"] == 0)
        check("overload", "0 other 5xx", str(over["other_5xx"]), over["other_5xx"] == 0)
        check("overload", "0 client timeouts, 0 connection errors",
              f"{over['client_timeouts']} timeouts, {over['connection_errors']} connection errors",
              over["client_timeouts"] == 0 and over["connection_errors"] == 0)
    if soaked := result.get("soak"):
        check("soak", "0 5xx", str(soaked["5xx"]), soaked["5xx"] == 0)
        check("soak", "0 client timeouts, 0 connection errors",
              f"{soaked['client_timeouts']} timeouts, {soaked['connection_errors']} connection errors",
              soaked["client_timeouts"] == 0 and soaked["connection_errors"] == 0)
        check("soak", "every valid request answered 200", json.dumps(soaked["groups"]["valid"]),
              set(soaked["groups"]["valid"]) == {"200"})
        check("soak", "invalid and hostile requests answered 4xx (the decodable bombs 200)",
              json.dumps({g: soaked["groups"][g] for g in ("invalid", "hostile")}),
              all(status.isdigit() and int(status) < 500 for g in ("invalid", "hostile") for status in soaked["groups"][g]))
        rss = soaked["memory"]["rss"] or soaked["memory"]["current"]
        if rss:
            check("soak", "no memory growth after warm-up (floor of RSS grows < 5 %)",
                  f"{rss['floor_after_warmup_mb']} -> {rss['floor_end_mb']} MB ({rss['floor_growth_pct']:+.1f} %)",
                  rss["floor_growth_pct"] < 5)
        check("soak", "container alive and healthy", json.dumps(soaked["container_after"]),
              soaked["container_after"]["running"] and soaked["container_after"]["ping"] == 200)
    if hostile := result.get("hostile"):
        check("hostile", "0 5xx, 0 client timeouts, 0 connection errors",
              f"{hostile['5xx']} 5xx, {hostile['client_timeouts']} timeouts, {hostile['connection_errors']} connection errors",
              hostile["5xx"] == 0 and hostile["client_timeouts"] == 0 and hostile["connection_errors"] == 0)
        check("hostile", f"not OOM-killed under --memory {hostile['memory_limit']}, healthy after",
              json.dumps(hostile["container_after"]),
              not hostile["container_after"]["oom_killed"] and hostile["container_after"]["ping"] == 200)
    return checks


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Hardening benchmark ({result['when']}, image `{result['image']['tag']}`)", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory_gib']} GiB; "
             f"run with `{result['command']}`; requests to the container's "
             f"{next(result[f]['reached_at'] for f in ('overload', 'soak', 'hostile') if f in result)}.", ""]
    if over := result.get("overload"):
        latency, refused = over["admitted_latency_ms"], over["refused_latency_ms"]
        factor = over["offered_rate_per_s"] / over["calibration"]["throughput_per_s"]
        lines += [f"## Overload: {over['offered_rate_per_s']:.0f}/s open loop for {over['duration_s']:g} s "
                  f"({factor:.1f}x the {over['calibration']['throughput_per_s']:.1f}/s "
                  f"sustained by {over['calibration']['concurrency']} closed-loop clients)", "",
                  "| sent | admitted (200) | admitted p50 / p99 / max ms | deadline | 503 (with Retry-After) | "
                  "503 p50 ms | other statuses | client timeouts | connection errors |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| {over['requests']} | {over['admitted']} ({over['admitted_per_s']:.1f}/s) | "
                  f"{latency['p50']:.0f} / {latency['p99']:.0f} / {latency['max']:.0f} | {over['deadline_s']:g} s | "
                  f"{over['503']} ({over['503_with_retry_after']}) | {refused['p50']:.1f} | "
                  f"{json.dumps({s: n for s, n in over['statuses'].items() if s not in ('200', '503')}) or '{}'} | "
                  f"{over['client_timeouts']} | {over['connection_errors']} |", ""]
    if soaked := result.get("soak"):
        rss, current = soaked["memory"]["rss"], soaked["memory"]["current"]
        lines += [f"## Soak: {soaked['concurrency']} clients for {soaked['duration_s']:g} s, mixed corpus", "",
                  "| requests | valid / invalid / hostile statuses | 5xx | timeouts / connection errors | "
                  "RSS floor after warm-up -> end (slope) | RSS at warm-up's end -> load's end -> after it | "
                  "cgroup memory at warm-up's end -> load's end | valid p99 spread |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {soaked['requests']} | {' / '.join(json.dumps(soaked['groups'][g]) for g in ('valid', 'invalid', 'hostile'))} | "
                  f"{soaked['5xx']} | {soaked['client_timeouts']} / {soaked['connection_errors']} | "
                  + (f"{rss['floor_after_warmup_mb']:.0f} -> {rss['floor_end_mb']:.0f} MB ({rss['floor_growth_pct']:+.1f} %, "
                     f"{rss['slope_mb_per_min']:+.1f} MB/min) | {rss['after_warmup_mb']:.0f} -> {rss['end_mb']:.0f} -> "
                     f"{rss['after_load_mb']:.0f} MB" if rss else "– | –") + " | "
                  + (f"{current['after_warmup_mb']:.0f} -> {current['end_mb']:.0f} MB" if current else "–")
                  + f" | {soaked['valid_p99_spread']}x |", "",
                  f"Warm-up: the first {soaked['warmup_s']:g} s; floors: the lowest reading (every "
                  f"{result['settings']['sample_s']:g} s) in the first and the last {rss.get('window_s', 0):g} s after it.", "",
                  "| minute | valid requests | p50 ms | p99 ms | RSS min / max MB |", "|---|---|---|---|---|",
                  *(f"| {row['minute']} | {row['requests']} | {row['p50']:.0f} | {row['p99']:.0f} | "
                    f"{row['rss_min_mb']} / {row['rss_max_mb']} |" for row in soaked["valid_per_minute"]), ""]
    if hostile := result.get("hostile"):
        lines += [f"## Hostile corpus alone: {hostile['concurrency']} clients for {hostile['duration_s']:g} s "
                  f"under `--memory {hostile['memory_limit']}`", "",
                  "| requests | statuses | idle after warm-up | peak (kernel) | sampled max | peak / idle | 5xx | OOM-killed |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {hostile['requests']} | {json.dumps(hostile['statuses'])} | {hostile['idle_mb']:.0f} MB | "
                  + (f"{hostile['peak_mb']:.0f} MB ({hostile['peak_meaning']})" if hostile["peak_mb"] else "–")
                  + f" | {hostile['sampled_max_mb']:.0f} MB | "
                  + (f"{hostile['peak_mb'] / hostile['idle_mb']:.2f}x" if hostile["peak_mb"] else "–")
                  + f" | {hostile['5xx']} | {hostile['container_after']['oom_killed']} |", ""]
    lines += ["## Goals", "", "| figure | goal | value | met |", "|---|---|---|---|",
              *(f"| {c['figure']} | {c['goal']} | {c['value'].replace('|', '/')} | {'yes' if c['met'] else '**no**'} |"
                for c in result["goals"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=os.environ.get("CLASSIFIER_IMAGE_CPU"),
                        help="the CPU image (default: $CLASSIFIER_IMAGE_CPU)")
    parser.add_argument("--figures", nargs="+", default=["overload", "soak", "hostile"],
                        choices=["overload", "soak", "hostile"])
    parser.add_argument("--natural-concurrency", type=int, default=8, help="clients of the calibration run")
    parser.add_argument("--calibrate-s", type=float, default=15, help="calibration run, after 5 s of warm-up")
    parser.add_argument("--overload-factor", type=float, default=4.0, help="offered rate / sustainable rate")
    parser.add_argument("--overload-rate", type=float, help="offered requests per second (default: the factor x "
                        "the calibrated rate); a fixed rate compares runs on a machine whose speed varies")
    parser.add_argument("--overload-s", type=float, default=60)
    parser.add_argument("--max-in-flight", type=int, default=2048, help="open connections the overload client allows")
    parser.add_argument("--soak-s", type=float, default=600)
    parser.add_argument("--soak-warmup-s", type=float, default=120, help="at most a quarter of --soak-s")
    parser.add_argument("--soak-concurrency", type=int, default=16, help="clients of the soak and the hostile run")
    parser.add_argument("--soak-requests", type=int, default=500_000, help="a bound on the soak's requests")
    parser.add_argument("--sample-s", type=float, default=5, help="memory sampling interval of the soak")
    parser.add_argument("--hostile-s", type=float, default=60)
    parser.add_argument("--hostile-requests", type=int, default=20_000, help="a bound on the hostile run's requests")
    parser.add_argument("--hostile-warmup-s", type=float, default=20, help="valid requests before the idle reading")
    parser.add_argument("--fast-sample-s", type=float, default=0.1, help="memory sampling of the hostile run (host reads)")
    parser.add_argument("--memory-limit", default="2g", help="docker run --memory of the hostile run")
    parser.add_argument("--published-port", action="store_true", help="send to 127.0.0.1:<published port>")
    parser.add_argument("--output", type=Path, default=RESULTS / "hardening.json")
    args = parser.parse_args()
    image_id = image_under_test(parser, args.image)
    began, started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    bodies = corpus()
    result: dict[str, Any] = {
        "when": began, "command": " ".join(["bench/hardening.py", *sys.argv[1:]]),
        "image": {"tag": args.image, "id": image_id}, "machine": machine(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "corpus": {body.kind: {"group": body.group, "bytes": len(body.content), "content_type": body.content_type,
                               "chunked": body.chunked, "weight": body.weight} for body in bodies},
    }
    with sigterm_as_interrupt():
        if "overload" in args.figures:
            result["overload"] = overload(args.image, args, bodies[0])
        if "soak" in args.figures:
            result["soak"] = soak(args.image, args, bodies)
        if "hostile" in args.figures:
            result["hostile"] = hostile_peak(args.image, args, [b for b in bodies if b.group == "valid"],
                                             [b for b in bodies if b.group == "hostile"])
    result["goals"] = goals(result)
    result["wall_clock_s"] = round(time.monotonic() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = markdown(result)
    args.output.with_suffix(".md").write_text(summary)
    print("\n" + summary)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')} in {result['wall_clock_s']} s")


if __name__ == "__main__":
    main()
