"""Does each scheduling rule pay? The server's policy against itself with one rule switched off.

    .venv/bin/python bench/scheduling.py            # 2 rounds, about 5 minutes per model on 2 cores
    .venv/bin/python bench/scheduling.py --quick    # a smoke run of every code path
    .venv/bin/python bench/scheduling.py --models efficientnet_lite0 resnet50

Each variant is a real server (``python -m serve``, default settings, uvicorn on 127.0.0.1)
whose :class:`serve.scheduling.Policy` has one rule switched off:

- ``policy``: the server as shipped;
- ``never wide``: no pass gets every core, even a lone one (each pass gets an equal share);
- ``whole queue``: a pass takes every queued image up to the largest batch (no fair share);
- ``decode beforehand``: every image is decoded on the decode pool, none inside its pass;
- ``unbounded batches``: a pass takes its fair share however long its images take (no bound by
  the work one pass should gather, ``BATCH_WORK_S``).

All variants stay loaded; round after round each is measured in turn (the order reversed every
other round) under a closed loop of 1 and of 8 clients sending real photos (as
bench/serve_load.py). Writes bench/results/scheduling.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

VARIANTS = ("policy", "never wide", "whole queue", "decode beforehand", "unbounded batches")


def patch(variant: str) -> None:
    """Switch one rule of the policy off (in the server process, before it starts)."""
    from serve.scheduling import Backlog, Pass, Policy

    if variant == "never wide":
        def never_wide(self: Policy, backlog: Backlog) -> Pass:
            return Pass(self.narrow_threads, wide=self.passes == 1)
        Policy.next_pass = never_wide  # type: ignore[method-assign]
    elif variant == "whole queue":
        Policy.batch_limit = lambda self, backlog: self.max_batch_size  # type: ignore[method-assign]
    elif variant == "decode beforehand":
        Policy.decodes_in_pass = lambda self, body_bytes, pixels: False  # type: ignore[method-assign]
    elif variant == "unbounded batches":
        Policy.useful_batch = property(lambda self: self.max_batch_size)  # type: ignore[assignment,method-assign]
    elif variant != "policy":
        raise SystemExit(f"unknown variant {variant!r}")


def serve(variant: str) -> int:
    patch(variant)
    from serve.__main__ import main

    return main()


@contextlib.contextmanager
def started(variant: str, port: int, model_dir: Path, cache: Path, log: Path) -> Iterator[str]:
    from servers import running

    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "CLASSIFIER_HOST": "127.0.0.1",
           "SM_MODEL_DIR": str(model_dir), "CLASSIFIER_GRAPH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    with running([sys.executable, __file__, "--serve", variant], port, log, env):
        yield f"http://127.0.0.1:{port}/invocations"


def model_folder(name: str, scratch: Path) -> Path:
    """The folder the servers load: empty for the built-in EfficientNet-Lite0, else an artifact of
    ``name`` with random weights (throughput does not depend on their values)."""
    folder = scratch / f"{name}-model"
    if name == "efficientnet_lite0":
        folder.mkdir()
        return folder
    import torch
    from serve_load import RESNET50_PREPROCESSING

    from classifier import artifact
    from classifier.artifact import Manifest
    from classifier.models import create_model
    from classifier.pretrained import imagenet_categories

    torch.manual_seed(0)
    manifest = Manifest(architecture=name, class_names=imagenet_categories(), preprocessing=RESNET50_PREPROCESSING)
    return artifact.save(folder, create_model(name, 1000), manifest)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_model(name: str, scratch: Path, *, rounds: int, duration_s: float, warmup_s: float,
              bodies: list[bytes]) -> list[dict[str, Any]]:
    from loadgen import run_load
    from servers import free_port

    model_dir, cache = model_folder(name, scratch), scratch / "graphs"
    samples: dict[tuple[str, int], list[Any]] = {}
    with contextlib.ExitStack() as stack:
        urls = {variant: stack.enter_context(started(variant, free_port(), model_dir, cache,
                                                     scratch / f"{name}-{variant.replace(' ', '-')}.log"))
                for variant in VARIANTS}
        for round_ in range(rounds):
            order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                for concurrency in (1, 8):
                    result = run_load(urls[variant], bodies, concurrency=concurrency, warmup_s=warmup_s,
                                      duration_s=duration_s)
                    samples.setdefault((variant, concurrency), []).append(result)
                    print(f"{name} round {round_ + 1} {variant:18} c={concurrency}: {result.throughput:6.1f} req/s, "
                          f"p50 {percentile(result.latencies_s, 0.5) * 1000:6.1f} ms, errors {result.errors}",
                          flush=True)
    rows = []
    for (variant, concurrency), results in samples.items():
        latencies = [latency for result in results for latency in result.latencies_s]
        rows.append({"model": name, "variant": variant, "concurrency": concurrency,
                     "throughput": statistics.median(result.throughput for result in results),
                     "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
                     "errors": sum(result.errors for result in results), "requests": len(latencies)})
    return rows


def markdown(rows: list[dict[str, Any]], about: dict[str, Any]) -> str:
    lines = ["# Scheduling rules, each switched off in turn (bench/scheduling.py)", "",
             f"{about['machine']}; tree {about['commit']}; {about['rounds']} rounds of {about['duration_s']:g} s "
             "per variant and concurrency; default settings; real photos. Ratios are against `policy` (the "
             "server as shipped) in the same run. Notes on the runs: "
             "[scheduling-notes.md](scheduling-notes.md).", "",
             "| model | variant | c=1 p50 ms | c=8 req/s | c=8 p99 ms | c=8 req/s vs policy | c=1 p50 vs policy |",
             "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(row["model"] for row in rows):
        find = {(row["variant"], row["concurrency"]): row for row in rows if row["model"] == model}
        base1, base8 = find[("policy", 1)], find[("policy", 8)]
        for variant in VARIANTS:
            one, eight = find[(variant, 1)], find[(variant, 8)]
            lines.append(f"| {model} | {variant} | {one['p50_ms']:.1f} | {eight['throughput']:.1f} | "
                         f"{eight['p99_ms']:.0f} | {eight['throughput'] / base8['throughput']:.2f}x | "
                         f"{one['p50_ms'] / base1['p50_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # run one variant's server (internal)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.serve:
        sys.exit(serve(args.serve))
    import report
    from serve_load import photo_bodies

    rounds, duration_s, warmup_s = (1, 2.0, 0.5) if args.quick else (2, 8.0, 1.5)
    bodies = photo_bodies()
    with tempfile.TemporaryDirectory(prefix="bench-scheduling-") as scratch:
        rows = [row for name in args.models
                for row in run_model(name, Path(scratch), rounds=rounds, duration_s=duration_s,
                                     warmup_s=warmup_s, bodies=bodies)]
    about = {"machine": report.machine(), "commit": report.commit(), "rounds": rounds, "duration_s": duration_s,
             "quick": args.quick}
    text = markdown(rows, about)
    print(text)
    if not args.quick:
        report.save("scheduling", {"about": about, "rows": rows}, text)


if __name__ == "__main__":
    main()
