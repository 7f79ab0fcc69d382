"""The CPU engines side by side: which one the server runs by default (CLASSIFIER_RUNTIME=auto).

    .venv/bin/python bench/runtimes.py              # about 8 minutes on 2 cores
    .venv/bin/python bench/runtimes.py --quick      # a smoke run of every code path

For EfficientNet-Lite0 (the built-in ImageNet weights) and ResNet-50 (random weights, 1000
classes), both at 224×224, it measures each engine on the same network:

- ``torchscript``: PyTorch, traced and frozen (the server's CPU path with CLASSIFIER_RUNTIME=torch);
- ``onnxruntime``: the network's exported graph in ONNX Runtime (the server's default on a CPU);
- ``openvino f32`` and ``openvino bf16``: the same graph in OpenVINO, in float32 and with its
  default precision on CPUs with bfloat16 instructions (measured only where ``openvino`` is
  installed; the image does not ship it);

each in three layouts of one process, as the server runs passes: one pass at a time with every
core's thread (a lone request), and one single-threaded pass per core side by side at batch 1 and
8 (concurrent load). Each point runs ``--seconds`` after a second of warm-up, in rounds whose
engine order is reversed every other round; throughput is the median over rounds. Every engine's
logits are compared with PyTorch's on the same inputs (largest difference, and whether every
top-1 agrees). Then the whole raw pipeline (decode, preprocess, forward, top-k; bench/raw_pipeline)
of ``torchscript`` and ``onnxruntime`` on real photos, in both process layouts.

Writes bench/results/runtimes.json and bench/results/runtimes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from raw_pipeline import RawPool  # noqa: E402

from classifier import export  # noqa: E402
from classifier.models import create_model  # noqa: E402
from classifier.onnx_model import OnnxModel  # noqa: E402
from classifier.pretrained import default_model  # noqa: E402
from serve.predictor import freeze  # noqa: E402

RESULTS = BENCH / "results"
CROP = 224
Run = Callable[[np.ndarray], np.ndarray]


def engines(model: torch.nn.Module, graph: bytes, cores: int) -> dict[str, dict[int, Callable[[], Run]]]:
    """For each engine, by thread count: a factory of a function running one batch (each calling
    thread makes its own, as OpenVINO needs one infer request per thread)."""
    frozen = freeze(model.to(memory_format=torch.channels_last), (3, CROP, CROP), torch.device("cpu"), torch.float32)
    assert frozen is not None

    def torchscript(threads: int) -> Callable[[], Run]:
        def run(batch: np.ndarray) -> np.ndarray:
            torch.set_num_threads(threads)
            inputs = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.jit.optimized_execution(False):
                return frozen(inputs).numpy()
        return lambda: run

    onnx = OnnxModel(graph, threads=sorted({1, cores}))
    found: dict[str, dict[int, Callable[[], Run]]] = {
        "torchscript": {count: torchscript(count) for count in sorted({1, cores})},
        "onnxruntime": {count: (lambda count=count: lambda batch: onnx(batch, count)) for count in sorted({1, cores})},
    }
    try:
        import openvino
    except ImportError:
        return found
    core = openvino.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.onnx"
        path.write_bytes(graph)
        read = core.read_model(str(path))
    for name, precision in (("openvino f32", "f32"), ("openvino bf16", "bf16")):
        compiled = {
            # One stream with every thread for a lone pass; a stream per core side by side.
            cores: core.compile_model(read, "CPU", {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                                    "INFERENCE_NUM_THREADS": cores,
                                                    "INFERENCE_PRECISION_HINT": precision}),
            1: core.compile_model(read, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": cores,
                                                "INFERENCE_NUM_THREADS": cores,
                                                "INFERENCE_PRECISION_HINT": precision}),
        }

        def per_thread(model: Any) -> Callable[[], Run]:
            def make() -> Run:
                request = model.create_infer_request()
                return lambda batch: request.infer({0: batch})[0]
            return make

        found[name] = {count: per_thread(model) for count, model in compiled.items()}
    return found


def measure(make: Callable[[], Run], *, threads: int, parallel: int, batch: np.ndarray,
            seconds: float) -> tuple[float, list[float]]:
    """Images per second and each pass's milliseconds with ``parallel`` threads running passes."""
    counts, latencies = [0] * parallel, [[] for _ in range(parallel)]
    opens = time.perf_counter() + 1.0
    closes = opens + seconds

    def loop(index: int) -> None:
        torch.set_num_threads(threads)
        run = make()
        for _ in range(100_000):
            began = time.perf_counter()
            if began >= closes:
                break
            run(batch)
            if began >= opens:
                counts[index] += len(batch)
                latencies[index].append((time.perf_counter() - began) * 1000)

    workers = [threading.Thread(target=loop, args=(index,)) for index in range(parallel)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / seconds, sorted(value for each in latencies for value in each)


def agreement(run: Run, model: torch.nn.Module) -> dict[str, Any]:
    inputs = export.sample(8, CROP, seed=7)
    with torch.inference_mode():
        expected = model(inputs).numpy()
    got = run(inputs.numpy())
    return {"max_difference": float(np.abs(got - expected).max()),
            "largest_logit": float(np.abs(expected).max()),
            "top1_agrees": bool((got.argmax(1) == expected.argmax(1)).all())}


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"efficientnet_lite0": default_model()[0].eval(), "resnet50": create_model("resnet50", 1000).eval()}


def photo_bodies() -> list[bytes]:
    from serve_load import photo_bodies as bodies

    return bodies()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "runtimes.json")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.5, 1
    cores = os.cpu_count() or 1
    layouts = [("one pass, every thread", cores, 1, 1), ("passes side by side", 1, cores, 1),
               ("passes side by side", 1, cores, 8)]
    started = time.time()
    load = os.getloadavg()[0]
    results: dict[str, Any] = {"machine": {"cores": cores, "processor": platform.processor() or platform.machine(),
                                           "load_average_at_start": load},
                               "versions": versions(), "forward": [], "pipeline": []}
    for name, model in models().items():
        graph = export.export(model, CROP)
        found = engines(model, graph, cores)
        data = export.sample(8, CROP, seed=3).numpy()
        checks = {engine: agreement(by_threads[cores](), model) for engine, by_threads in found.items()}
        runs: dict[tuple[str, int], list[float]] = {}
        latencies: dict[tuple[str, int], list[float]] = {}
        points = [(engine, index) for engine in found for index in range(len(layouts))]
        for round_index in range(args.rounds):
            for engine, index in points if round_index % 2 == 0 else points[::-1]:
                _, threads, parallel, batch = layouts[index]
                rate, passes = measure(found[engine][threads], threads=threads, parallel=parallel,
                                       batch=data[:batch], seconds=args.seconds)
                runs.setdefault((engine, index), []).append(rate)
                latencies.setdefault((engine, index), []).extend(passes)
                print(f"{name} {engine} {layouts[index]} round {round_index}: {rate:.1f} img/s", flush=True)
        for (engine, index), rates in runs.items():
            label, threads, parallel, batch = layouts[index]
            passes = latencies[(engine, index)]
            results["forward"].append({
                "model": name, "engine": engine, "layout": label, "threads_per_pass": threads,
                "passes_at_once": parallel, "batch": batch, "images_per_s": statistics.median(rates),
                "rounds": rates, "pass_ms_p50": passes[len(passes) // 2] if passes else None,
                **checks[engine]})
        del found
        results["pipeline"] += pipelines(name, model, graph, cores, args)
    results["wall_s"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    markdown = report(results, args)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)


def pipelines(name: str, model: torch.nn.Module, graph: bytes, cores: int,
              args: argparse.Namespace) -> list[dict[str, Any]]:
    """The raw pipeline of both engines the image has, in its process layouts, on real photos."""
    from classifier import artifact
    from classifier.pretrained import IMAGENET_LITE0_PREPROCESSING, imagenet_categories

    bodies = photo_bodies()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        model_dir = None
        if name != "efficientnet_lite0":
            manifest = artifact.Manifest(architecture=name, class_names=imagenet_categories(),
                                         preprocessing=IMAGENET_LITE0_PREPROCESSING)
            model_dir = artifact.save(Path(folder) / "model", model, manifest)
            (model_dir / export.GRAPH_FILE).write_bytes(graph)
        for engine, runtime in (("torchscript", "torch"), ("onnxruntime", "onnxruntime")):
            for processes, threads in ((cores, 1), (1, cores)):
                pool = RawPool(processes, threads, model_dir, bodies, engine=runtime)
                try:
                    pool.wait_ready()
                    rates = [pool.run(batch=1, warmup_s=1.0, duration_s=args.seconds).throughput
                             for _ in range(args.rounds)]
                finally:
                    pool.close()
                rows.append({"model": name, "engine": engine, "processes": processes, "threads": threads,
                             "images_per_s": statistics.median(rates), "rounds": rates})
                print(f"{name} raw pipeline {engine} {processes}x{threads}: {rows[-1]['images_per_s']:.1f}/s",
                      flush=True)
    return rows


def versions() -> dict[str, str]:
    import onnxruntime

    found = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        found["openvino"] = openvino.__version__
    except ImportError:
        pass
    return found


def fixed(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    machine = results["machine"]
    lines = [
        "# CPU engines side by side",
        "",
        f"Run {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} with `bench/runtimes.py`"
        f"{' --quick' if args.quick else ''}: {machine['cores']} cores ({machine['processor']}), load average "
        f"{machine['load_average_at_start']:.2f} at start; {args.rounds} round(s) of {args.seconds:g} s per point; "
        f"throughput is the median over rounds. Versions: "
        + ", ".join(f"{key} {value}" for key, value in results["versions"].items()) + ".",
        "",
        "Forward passes only (images/s; p50 of one pass in ms; logits compared with PyTorch's on 8 inputs):",
        "",
        "| model | engine | layout | batch | images/s | pass p50 ms | largest logit difference | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["forward"]:
        lines.append(f"| {row['model']} | {row['engine']} | {row['layout']} ({row['passes_at_once']}×"
                     f"{row['threads_per_pass']} thread{'s' if row['threads_per_pass'] > 1 else ''}) | {row['batch']} | "
                     f"{row['images_per_s']:.1f} | {fixed(row['pass_ms_p50'])} | {row['max_difference']:.1e} "
                     f"(of {row['largest_logit']:.1f}) | {'same' if row['top1_agrees'] else 'differs'} |")
    lines += ["", "The raw pipeline (decode, preprocess, forward, top-k) on real photos, batch 1 (images/s):", "",
              "| model | engine | processes × threads | images/s |", "|---|---|---|---|"]
    for row in results["pipeline"]:
        lines.append(f"| {row['model']} | {row['engine']} | {row['processes']}×{row['threads']} | "
                     f"{row['images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
