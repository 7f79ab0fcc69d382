"""What multi-model mode costs: the same model served single-model and multi-model, side by side.

    export CLASSIFIER_IMAGE_CPU=$(container/build-image.sh cpu)
    .venv/bin/python bench/mme_overhead.py              # about 3 minutes on 2 cores
    .venv/bin/python bench/mme_overhead.py --quick      # a smoke run: about 1 minute

The ImageNet EfficientNet-Lite0 shipped in the image is written once in the artifact format and
served by three containers of the same image, all started before measuring and kept loaded:

- single: ``serve`` with the artifact in /opt/ml/model, requests to ``POST /invocations``;
- multi, one model: multi-model mode with the artifact loaded by ``POST /models``, requests to
  ``POST /models/<name>/invoke``;
- multi, two models: two copies loaded, the load split evenly between them (each model batches
  only its own requests, so batches are smaller).

Round after round (order reversed every other round) each is measured with a closed loop of 1 and
of 8 concurrent clients sending four real photos. Throughput is the median over rounds; latency
percentiles pool the rounds. The ratios multi / single are the overhead of multi-model mode.
Writes bench/results/mme_overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT)]

import httpx  # noqa: E402
from loadgen import LoadResult, closed_loop  # noqa: E402
from PIL import Image  # noqa: E402

from classifier import artifact  # noqa: E402
from classifier.pretrained import default_model  # noqa: E402
from deploy.host import (  # noqa: E402
    direct_url,
    encode,  # noqa: E402
    serving,
)

RESULTS = BENCH / "results"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SYSTEMS = ("single", "multi, one model", "multi, two models")


def photo_bodies() -> list[bytes]:
    from skimage import data

    return [encode(Image.fromarray(getattr(data, name)()), "JPEG", quality=90) for name in PHOTOS]


def load_models(url: str, names: Sequence[str]) -> None:
    for name in names:
        response = httpx.post(f"{url}/models", json={"model_name": name, "url": f"/opt/ml/models/{name}/model"},
                              timeout=120)
        response.raise_for_status()


async def split_load(urls: Sequence[str], bodies: list[bytes], concurrency: int, warmup_s: float,
                     duration_s: float) -> LoadResult:
    """``concurrency`` clients spread evenly over ``urls``, as one result."""
    share = concurrency // len(urls)
    parts = await asyncio.gather(*(closed_loop(url, bodies, concurrency=share, warmup_s=warmup_s,
                                               duration_s=duration_s, max_requests=20_000) for url in urls))
    merged = LoadResult(concurrency, duration_s)
    for part in parts:
        merged.latencies_s += part.latencies_s
        merged.errors += part.errors
        merged.error_example = merged.error_example or part.error_example
        merged.timings += part.timings
    return merged


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=os.environ.get("CLASSIFIER_IMAGE_CPU"), help="default: $CLASSIFIER_IMAGE_CPU")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not args.image:
        parser.error("give --image or set CLASSIFIER_IMAGE_CPU (container/build-image.sh cpu prints it)")
    image = args.image
    rounds, warmup_s, duration_s = (1, 1.0, 3.0) if args.quick else (3, 2.0, 8.0)
    bodies = photo_bodies()
    started = time.perf_counter()
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="mme-bench-") as scratch, contextlib.ExitStack() as stack:
        model, manifest = default_model()
        models = Path(scratch) / "models"
        for name in ("lite0", "lite0-copy"):
            artifact.save(models / name / "model", model, manifest)
        # Inference threads = cores in every container (the server's default for one worker).
        single = stack.enter_context(serving(image, "-v", f"{models / 'lite0' / 'model'}:/opt/ml/model:ro"))
        multi_one = stack.enter_context(serving(image, "-e", "SAGEMAKER_MULTI_MODEL=true",
                                                "-v", f"{models}:/opt/ml/models:ro"))
        multi_two = stack.enter_context(serving(image, "-e", "SAGEMAKER_MULTI_MODEL=true",
                                                "-v", f"{models}:/opt/ml/models:ro"))
        bases = {label: direct_url(served.container) or served.url
                 for label, served in zip(SYSTEMS, (single, multi_one, multi_two))}
        load_models(bases["multi, one model"], ["lite0"])
        load_models(bases["multi, two models"], ["lite0", "lite0-copy"])
        targets = {
            "single": [f"{bases['single']}/invocations"],
            "multi, one model": [f"{bases['multi, one model']}/models/lite0/invoke"],
            "multi, two models": [f"{bases['multi, two models']}/models/{name}/invoke" for name in ("lite0", "lite0-copy")],
        }
        for round_ in range(rounds):
            order = SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]
            for concurrency in (1, 8):
                for label in order:
                    # Two models need at least one client each: at c=1 they take turns over the rounds.
                    urls = targets[label] if concurrency > 1 else [targets[label][round_ % len(targets[label])]]
                    result = asyncio.run(split_load(urls, bodies, concurrency, warmup_s, duration_s))
                    runs.append({"system": label, "concurrency": concurrency, "round": round_,
                                 "throughput": len(result.latencies_s) / duration_s, "errors": result.errors,
                                 "error_example": result.error_example,
                                 "latencies_ms": [round(s * 1000, 3) for s in result.latencies_s],
                                 "batch_sizes": [t.get("batch", 1) for t in result.timings]})
                    print(f"round {round_} c={concurrency} {label}: {runs[-1]['throughput']:.1f} req/s, "
                          f"{result.errors} errors", flush=True)
    rows = []
    for label in SYSTEMS:
        for concurrency in (1, 8):
            mine = [run for run in runs if run["system"] == label and run["concurrency"] == concurrency]
            latencies = [value for run in mine for value in run["latencies_ms"]]
            batches = [value for run in mine for value in run["batch_sizes"]]
            rows.append({"system": label, "concurrency": concurrency,
                         "throughput": round(statistics.median(run["throughput"] for run in mine), 2),
                         "p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
                         "mean_batch": round(statistics.fmean(batches), 2) if batches else None,
                         "errors": sum(run["errors"] for run in mine)})

    def row(label: str, concurrency: int) -> dict[str, object]:
        return next(r for r in rows if r["system"] == label and r["concurrency"] == concurrency)

    ratios = {f"{label} / single, c={c} {key}": round(row(label, c)[key] / row("single", c)[key], 3)
              for label in SYSTEMS[1:] for c in (1, 8) for key in (("throughput", "p50_ms") if c == 1 else ("throughput",))}
    table = ["| system | c=1 req/s | c=1 p50 ms | c=1 p99 ms | c=8 req/s | c=8 p50 ms | c=8 p99 ms | c=8 mean batch |",
             "|---|---|---|---|---|---|---|---|"]
    for label in SYSTEMS:
        one, eight = row(label, 1), row(label, 8)
        table.append(f"| {label} | {one['throughput']} | {one['p50_ms']} | {one['p99_ms']} | {eight['throughput']} | "
                     f"{eight['p50_ms']} | {eight['p99_ms']} | {eight['mean_batch']} |")
    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / "mme_overhead.json"
    output.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "image": image, "quick": args.quick,
        "rounds": rounds, "warmup_s": warmup_s, "duration_s": duration_s,
        "wall_clock_s": round(time.perf_counter() - started), "summary": rows, "ratios": ratios,
        "table_markdown": "\n".join(table), "runs": runs,
    }, indent=1))
    print("\n".join(table))
    for name, value in ratios.items():
        print(f"{name}: {value}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
