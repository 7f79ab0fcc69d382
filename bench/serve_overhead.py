"""Where a served request's CPU goes besides its forward pass: the server's threads, the load
generator and idle cores, beside the raw pipeline and a bare uvicorn app on the same cores.

    .venv/bin/python bench/serve_overhead.py            # 3 rounds, about 2 minutes on 2 cores
    .venv/bin/python bench/serve_overhead.py --quick    # a smoke run

Three systems on 127.0.0.1, each measured in turn every round:

- ``ours``: ``python -m serve`` at its default settings with the built-in EfficientNet-Lite0,
  under a closed loop of 8 clients sending real photos (as bench/serve_load.py);
- ``raw``: the raw pipeline's best layout there (2 processes x 1 thread, batch 8), no HTTP;
- ``bare uvicorn``: an ASGI app that reads the body and answers a fixed JSON, on the same uvicorn
  (httptools, uvloop), under the same 8 clients: the web server's floor.

For ``ours`` the CPU seconds of the event-loop thread and of every other thread of the server come
from /proc, the load generator's from its own rusage, and idle cores from /proc/stat, each divided
by the requests answered in the window. Writes bench/results/serve_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BARE_APP = '''
import sys, uvicorn
BODY = b'[{"label": "tabby", "probability": 0.5}]'
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
            loop="uvloop", http="httptools")
'''


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def machine_idle_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / CLOCK_TICKS  # idle + iowait


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_http(url: str, pid: int, bodies: list[bytes], *, duration_s: float, warmup_s: float) -> dict[str, Any]:
    from loadgen import run_load

    run_load(url, bodies, concurrency=8, warmup_s=0, duration_s=warmup_s)
    threads, client, idle = thread_cpu_s(pid), own_cpu_s(), machine_idle_s()
    started = time.perf_counter()
    result = run_load(url, bodies, concurrency=8, warmup_s=0, duration_s=duration_s, max_requests=100_000)
    wall = time.perf_counter() - started
    after, client, idle = thread_cpu_s(pid), own_cpu_s() - client, machine_idle_s() - idle
    loop = after.get(pid, 0.0) - threads.get(pid, 0.0)  # the main thread runs the event loop
    others = sum(seconds - threads.get(tid, 0.0) for tid, seconds in after.items() if tid != pid)
    answered = max(1, len(result.latencies_s))
    batches = [timing["batch"] for timing in result.timings if "batch" in timing]
    return {"throughput": len(result.latencies_s) / duration_s, "errors": result.errors,
            "loop_ms": loop / answered * 1000, "other_threads_ms": others / answered * 1000,
            "client_ms": client / answered * 1000, "idle_cores": idle / wall,
            "median_batch": statistics.median(batches) if batches else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import report
    from raw_pipeline import RawPool
    from serve_load import photo_bodies
    from servers import free_port, running

    rounds, duration_s, warmup_s = (1, 2.0, 1.0) if args.quick else (3, 8.0, 2.0)
    bodies = photo_bodies()
    samples: dict[str, list[dict[str, Any]]] = {"ours": [], "raw": [], "bare uvicorn": []}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as scratch, contextlib.ExitStack() as stack:
        folder, ours_port, bare_port = Path(scratch) / "model", free_port(), free_port()
        folder.mkdir()
        env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(ours_port), "CLASSIFIER_HOST": "127.0.0.1",
               "SM_MODEL_DIR": str(folder), "PYTHONPATH": str(ROOT)}
        ours = stack.enter_context(running([sys.executable, "-m", "serve"], ours_port, Path(scratch) / "ours.log", env))
        bare = stack.enter_context(running([sys.executable, "-c", BARE_APP, str(bare_port)], bare_port,
                                           Path(scratch) / "bare.log"))
        pool = RawPool(2, 1, None, bodies)
        stack.callback(pool.close)
        pool.wait_ready()
        measures = {
            "ours": lambda: measure_http(f"http://127.0.0.1:{ours_port}/invocations", ours.pid, bodies,
                                         duration_s=duration_s, warmup_s=warmup_s),
            "bare uvicorn": lambda: measure_http(f"http://127.0.0.1:{bare_port}/", bare.pid, bodies,
                                                 duration_s=duration_s / 2, warmup_s=warmup_s / 2),
            "raw": lambda: {"throughput": pool.run(batch=8, warmup_s=warmup_s, duration_s=duration_s).throughput},
        }
        for round_ in range(rounds):
            order = list(measures) if round_ % 2 == 0 else list(reversed(measures))
            for system in order:
                samples[system].append(measures[system]())
            print(f"round {round_ + 1}: " + ", ".join(f"{system} {samples[system][-1]['throughput']:.1f}/s"
                                                      for system in measures), flush=True)
    summary = {system: {key: statistics.median(sample[key] for sample in runs)
                        for key in runs[0] if runs[0][key] is not None}
               for system, runs in samples.items()}
    about = {"machine": report.machine(), "commit": report.commit(), "rounds": rounds, "duration_s": duration_s,
             "quick": args.quick}
    text = markdown(summary, about)
    print(text)
    if not args.quick:
        report.save("serve_overhead", {"about": about, "rounds": samples, "medians": summary}, text)


def markdown(summary: dict[str, dict[str, float]], about: dict[str, Any]) -> str:
    ours, raw, bare = summary["ours"], summary["raw"], summary["bare uvicorn"]
    cores = os.cpu_count() or 1
    budget_ms = cores * 1000 / ours["throughput"]  # core-milliseconds the machine had per answered request
    raw_ms = cores * 1000 / raw["throughput"]
    lines = ["# Where a served request's CPU goes (bench/serve_overhead.py)", "",
             f"{about['machine']}; tree {about['commit']}; medians of {about['rounds']} rounds of "
             f"{about['duration_s']:g} s; EfficientNet-Lite0 at its default settings, 8 clients, real photos. "
             "Notes on the runs: [serve_overhead-notes.md](serve_overhead-notes.md).", "",
             f"- ours: {ours['throughput']:.1f} req/s (median batch {ours.get('median_batch', 0):g}); the raw "
             f"pipeline, 2 processes x 1 thread, batch 8: {raw['throughput']:.1f}/s "
             f"({ours['throughput'] / raw['throughput']:.2f}x).",
             f"- Each answered request had {budget_ms:.2f} core-ms of the machine; a raw image takes "
             f"{raw_ms:.2f}.", "",
             "| per answered request | core-ms |", "|---|---|",
             f"| server threads other than the event loop (decode, preprocess, forward) | {ours['other_threads_ms']:.2f} |",
             f"| the event loop (HTTP, routing, the service, encoding) | {ours['loop_ms']:.2f} |",
             f"| the load generator (aiohttp) | {ours['client_ms']:.2f} |",
             f"| cores idle ({ours['idle_cores']:.2f} of {cores} on average) | "
             f"{ours['idle_cores'] * 1000 / ours['throughput']:.2f} |", "",
             f"The bare uvicorn app answered {bare['throughput']:.0f} req/s with {bare['loop_ms']:.3f} core-ms per "
             f"request in its process and {bare['client_ms']:.3f} in the load generator: the web server's floor.",
             ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
