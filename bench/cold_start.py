"""Cold start of the serving image: seconds from the container's start to an accepted connection
and to the first ``/ping`` 200, with the built-in model (its graph baked into the image), and the
image's size.

    export CLASSIFIER_IMAGE_CPU=$(container/build-image.sh cpu)
    .venv/bin/python bench/cold_start.py            # 10 starts, about two minutes
    .venv/bin/python bench/cold_start.py --starts 1

Each start is a fresh ``docker start`` of ``IMAGE serve`` with an empty /opt/ml/model, measured
as deploy/check.py measures SageMaker's 250 ms rule (from Docker's record of the container's
start); /ping is polled every 50 ms. Where the time went comes from the server's own log lines,
timed by Docker as it received them (``docker logs --timestamps``, the clock of the container's
start): the server process started (Python and its imports done), then the model ready. Writes
bench/results/cold_start.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent)]

from deploy import host  # noqa: E402
from deploy.check import Checker, Server  # noqa: E402

RESULTS = BENCH / "results"
POLL_S = 0.05
# The server's log lines that end each phase of a start.
PROCESS_STARTED = "Started server process"
MODEL_READY = "model ready"


def logged_at(log: str, text: str) -> float | None:
    """Wall-clock time of the first line of ``docker logs --timestamps`` output that holds
    ``text`` (Docker's prefix: its RFC 3339 time in UTC)."""
    for line in log.splitlines():
        stamp, _, message = line.partition(" ")
        if text in message:
            return host.parse_docker_time(stamp)
    return None


def first_ping_s(checker: Checker, server: Server, deadline_s: float = 120) -> float:
    """Seconds from the container's start to its first /ping 200 (polled every POLL_S)."""
    while time.time() - server.started < deadline_s:
        try:
            if host.request(server.port, "GET", "/ping", timeout=2).status == 200:
                return time.time() - server.started
        except OSError:
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"no /ping 200 within {deadline_s:g} s: {checker.logs(server.container)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=os.environ.get("CLASSIFIER_IMAGE_CPU"))
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()
    if not args.image:
        parser.error("name the image: --image or CLASSIFIER_IMAGE_CPU")
    size = int(host.docker("image", "inspect", "-f", "{{.Size}}", args.image).stdout.strip())
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-cold-start-") as scratch:
        model_dir = Path(scratch) / "model"
        model_dir.mkdir()
        model_dir.chmod(0o755)
        checker = Checker(args.image, Path(scratch), hyperparameters={}, broken_hyperparameters={},
                          train_timeout_s=60, ping_deadline_s=120, stop_timeout_s=30, progress=None)
        try:
            for number in range(args.starts):
                server, accept_s = checker.start(model_dir)
                if server.error or accept_s is None:
                    raise RuntimeError(f"start {number + 1}: {server.error or 'no connection accepted'}")
                ready_s = first_ping_s(checker, server)
                logged = host.docker("logs", "--timestamps", server.container)
                log = logged.stdout + "\n" + logged.stderr
                process_at, model_at = logged_at(log, PROCESS_STARTED), logged_at(log, MODEL_READY)
                if process_at is None or model_at is None:
                    raise RuntimeError(f"start {number + 1}: the log lacks {PROCESS_STARTED!r} or {MODEL_READY!r}")
                if not server.started <= process_at <= model_at <= server.started + ready_s:
                    raise RuntimeError(f"start {number + 1}: the log's times are out of order with the start and "
                                       f"the first /ping 200")
                host.docker("rm", "-f", server.container)
                runs.append({"accept_ms": round(accept_s * 1000, 1), "first_ping_200_s": round(ready_s, 2),
                             "process_started_s": round(process_at - server.started, 2),
                             "model_ready_after_s": round(model_at - process_at, 2)})
                print(f"start {number + 1}: accepted {accept_s * 1000:.0f} ms, process started at "
                      f"{runs[-1]['process_started_s']:.2f} s, model ready {runs[-1]['model_ready_after_s']:.2f} s "
                      f"later, /ping 200 at {ready_s:.2f} s", flush=True)
        finally:
            checker.close()
    result = {
        "image": args.image, "image_bytes": size, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_at_end": round(os.getloadavg()[0], 2), "runs": runs,
        "median_accept_ms": statistics.median(run["accept_ms"] for run in runs),
        "median_first_ping_200_s": statistics.median(run["first_ping_200_s"] for run in runs),
        "median_process_started_s": statistics.median(run["process_started_s"] for run in runs),
        "median_model_ready_after_s": statistics.median(run["model_ready_after_s"] for run in runs),
    }
    report = "\n".join([
        "# Cold start (bench/cold_start.py)", "",
        f"`{args.image}`, {size / 1e9:.2f} GB; {result['machine']}, load {result['load_at_end']} at the end; "
        f"{len(runs)} starts with the built-in model.", "",
        "| | median | every start |", "|---|---|---|",
        f"| connection accepted after the container's start | {result['median_accept_ms']:.0f} ms | "
        + ", ".join(f"{run['accept_ms']:.0f}" for run in runs) + " |",
        f"| first `/ping` 200 | {result['median_first_ping_200_s']:.2f} s | "
        + ", ".join(f"{run['first_ping_200_s']:.2f}" for run in runs) + " |",
        f"| of which: until the server process started (Python and its imports) | "
        f"{result['median_process_started_s']:.2f} s | "
        + ", ".join(f"{run['process_started_s']:.2f}" for run in runs) + " |",
        f"| then until the model was ready (the baked graph opened, the warm-up pass, the passes timed "
        f"to bound batches) | {result['median_model_ready_after_s']:.2f} s | "
        + ", ".join(f"{run['model_ready_after_s']:.2f}" for run in runs) + " |", "",
        "Accepted at 0 ms: the first connection attempt that the server answered began before the time "
        "Docker records as the container's start (attempts every 5 ms); the socket is bound before any "
        "heavy import. The two phases come from the server's log lines (\"" + PROCESS_STARTED + "\", \""
        + MODEL_READY + "\"); /ping's 200 follows the second within one poll.", ""])
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cold_start.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "cold_start.md").write_text(report)


if __name__ == "__main__":
    main()
