"""Handler mode under load: a SageMaker-style ``inference.py`` served by our container and by TorchServe.

    export CLASSIFIER_IMAGE_CPU=$(container/build-image.sh cpu)
    .venv/bin/python bench/handler_load.py              # the full run: about 12 minutes on 2 cores
    .venv/bin/python bench/handler_load.py --quick      # a smoke run of every system: about 2 minutes
    .venv/bin/python bench/handler_load.py --duration 30 --rounds 1

The first run also creates bench/.venv-torchserve (see bench/servers.py).

ResNet-50 (torchvision's, random weights from a fixed seed, 1000 classes) is written the way a
SageMaker user writes a model for the PyTorch framework container: ``model.pth`` (a state dict)
and ``code/inference.py`` with ``model_fn``, ``input_fn`` (a JPEG to a 1x3x224x224 tensor),
``predict_fn`` (softmax) and ``output_fn`` (top 5 per row, JSON). The same weights are also
written as our built-in artifact. The systems, each started on its own, checked, measured and
stopped before the next starts:

- plain loop: input_fn -> predict_fn -> output_fn in this process, one request after another, torch
  using every core: the floor for what serving the handlers costs (concurrency 1 only);
- ours handler: our container serving the handler folder, default settings;
- ours handler batched: the same with ``CLASSIFIER_HANDLER_BATCHING=true`` (requests through
  input_fn share predict_fn calls); an image without that switch ignores it;
- ours built-in: our container serving the same weights as a built-in artifact, default settings;
- TorchServe + same handler: the same folder and inference.py on TorchServe, run the way
  SageMaker's PyTorch inference toolkit runs it (bench/torchserve/sagemaker_handler.py), as
  2 workers x 1 torch thread (bench/serve_load.py's best eager-mode TorchServe layout at
  concurrency 8 on 2 cores) and 1 worker x 2 threads (better alone at concurrency 1).

Before measuring, each system answers each photo alone and then (the servers) eight requests at
once: every answer's top-1 class, and for the handler systems its probability, must match the
plain loop's for that photo (so a batching server must give each request its own rows back); the
run stops otherwise. Each is then measured with a closed loop of 1 and of 8
concurrent clients sending four real photos (bench/serve_load.py's), round after round, the order
reversed every other round (the plain loop sits next to "ours handler" either way, so the
overhead check compares neighbours in time). Throughput is the median over rounds; latency
percentiles pool the rounds.

Then the overhead at concurrency 1 is measured on its own, side by side: the plain loop and "ours
handler" take turns request by request (so both see the same moment of a noisy machine), the
server's requests sent by a lean client (one kept-alive socket, the request bytes prepared
beforehand) whose own cost is a few microseconds, where the load generator's HTTP client costs
one to two milliseconds a request on two busy cores. Its answer also carries the time the
handlers took in the server (Server-Timing), which splits the overhead into the server's
request path and the handlers running slower or faster than in the loop.

Writes bench/results/handler_load.json (every run, the machine, the versions) and
bench/results/handler_load.md, and prints the table and the checks:
(a) handler overhead at concurrency 1 (side by side: ours handler p50 - plain loop p50) <= 2 ms;
(b) ours handler batched / ours built-in throughput at concurrency 8 >= 0.9;
(c) ours handler against TorchServe + same handler at concurrencies 1 and 8.
On a machine shared with other work the forward pass alone swings by several ms from minute to
minute: read (a) with its per-round values, and trust a quiet machine's run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT)]

import httpx  # noqa: E402
import torch  # noqa: E402
from loadgen import LoadResult, parse_server_timing, run_load  # noqa: E402
from serve_load import (  # noqa: E402
    PHOTOS,
    RESNET50_PREPROCESSING,
    image_under_test,
    machine,
    percentile,
    photo_bodies,
    ping_round_trip_ms,
    sigterm_as_interrupt,
    versions,
)
from servers import TORCHSERVE_FILES, TorchServe, TorchServeConfig, torchserve_venv  # noqa: E402

from classifier import artifact  # noqa: E402
from classifier.artifact import Manifest  # noqa: E402
from classifier.models import create_model  # noqa: E402
from classifier.pretrained import imagenet_categories  # noqa: E402
from deploy.host import direct_url, docker, serving  # noqa: E402

RESULTS = BENCH / "results"
CONCURRENCIES = (1, 8)
TORCHSERVE_MODEL = "resnet50-handler"
BATCHING_SWITCH = "CLASSIFIER_HANDLER_BATCHING"
OVERHEAD_GOAL_MS = 2.0
OVERHEAD_PAIRS = 300  # plain-loop call and server request, taking turns
BATCHED_GOAL = 0.9
Answer = tuple[list[int], list[float]]  # top-5 class indices and their probabilities

# The user's code, as SageMaker's PyTorch documentation shows it. predict_fn and output_fn work on
# whole tensors along dim 0, so a batch of N requests' rows goes through them unchanged.
INFERENCE_PY = '''\
"""ResNet-50 handlers for SageMaker's PyTorch serving: model_fn, input_fn, predict_fn, output_fn."""

import io
import json
import os

import torch
import torchvision
from PIL import Image
from torchvision import transforms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PREPROCESS = transforms.Compose([
    transforms.Resize(256),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


def model_fn(model_dir):
    model = torchvision.models.resnet50(weights=None, num_classes=1000)
    state = torch.load(os.path.join(model_dir, "model.pth"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(DEVICE).eval()


def input_fn(request_body, content_type):
    if content_type.split(";")[0].strip() != "image/jpeg":
        raise ValueError(f"unsupported content type {content_type!r}: send image/jpeg")
    image = Image.open(io.BytesIO(request_body)).convert("RGB")
    return PREPROCESS(image).unsqueeze(0)


def predict_fn(input_data, model):
    with torch.inference_mode():
        return torch.softmax(model(input_data.to(DEVICE)), dim=1)


def output_fn(prediction, accept):
    if accept.split(";")[0].strip() not in ("application/json", "*/*"):
        raise ValueError(f"cannot answer with {accept!r}: ask for application/json")
    probabilities, indices = prediction.topk(5, dim=1)
    return json.dumps([{"indices": row, "probabilities": values}
                       for row, values in zip(indices.tolist(), probabilities.tolist())])
'''


# --- the plan and the systems -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    warmup_s: dict[int, float]  # per concurrency; c=8 follows c=1 on a system already warm
    duration_s: float

    def estimate_s(self, systems: Sequence[System], startup_s: float = 12.0) -> float:
        points = sum(self.warmup_s[c] + self.duration_s for system in systems for c in system.concurrencies)
        return self.rounds * (points + startup_s * len(systems))


def make_plan(quick: bool, duration_s: float | None, rounds: int | None) -> Plan:
    if quick:
        plan = Plan(rounds=1, warmup_s={1: 1.0, 8: 1.0}, duration_s=3.0)
    else:
        plan = Plan(rounds=2, warmup_s={1: 5.0, 8: 3.0}, duration_s=20.0)
    return Plan(rounds=rounds or plan.rounds, warmup_s=plan.warmup_s, duration_s=duration_s or plan.duration_s)


@dataclass(frozen=True)
class System:
    label: str
    kind: str  # "loop", "ours" or "torchserve"
    settings: str
    serves: str = "handler"  # ours: the handler folder, or "built-in": the artifact
    env: tuple[tuple[str, str], ...] = ()
    torchserve: TorchServeConfig | None = None
    concurrencies: tuple[int, ...] = CONCURRENCIES


SYSTEMS = (
    System("plain loop", "loop", f"in this process, {os.cpu_count()} torch threads", concurrencies=(1,)),
    System("ours handler", "ours", "default"),
    System("ours handler batched", "ours", f"{BATCHING_SWITCH}=true", env=((BATCHING_SWITCH, "true"),)),
    System("ours built-in", "ours", "default, built-in artifact", serves="built-in"),
    System("TorchServe + same handler", "torchserve", "2 workers x 1 thread",
           torchserve=TorchServeConfig("2 workers x 1 thread", workers=2, threads=1)),
    System("TorchServe + same handler", "torchserve", "1 worker x 2 threads",
           torchserve=TorchServeConfig("1 worker x 2 threads", workers=1, threads=2)),
)


def name(system: System) -> str:
    return f"{system.label} ({system.settings})" if system.kind == "torchserve" else system.label


@dataclass
class Prepared:
    """The same weights in both shapes: the SageMaker handler folder and our artifact; a .mar of the folder."""

    handler_dir: Path
    artifact_dir: Path
    torchserve_store: Path


def write_handler_folder(folder: Path, model: torch.nn.Module) -> Path:
    """``model.pth`` and ``code/inference.py``, as a SageMaker PyTorch user packs model.tar.gz."""
    (folder / "code").mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pth")
    (folder / "code" / "inference.py").write_text(INFERENCE_PY)
    return folder


def prepare(scratch: Path, torchserve_python: Path) -> Prepared:
    torch.manual_seed(0)  # random weights: throughput does not depend on their values
    model = create_model("resnet50", 1000).eval()  # torchvision's resnet50, as model_fn builds it
    handler_dir = write_handler_folder(scratch / "handler-model", model)
    manifest = Manifest(architecture="resnet50", class_names=imagenet_categories(), preprocessing=RESNET50_PREPROCESSING)
    artifact_dir = artifact.save(scratch / "builtin-model", model, manifest)
    store = scratch / "torchserve-store"
    store.mkdir()
    # As the SageMaker toolkit adapts /opt/ml/model for TorchServe: the folder's files as the
    # archive's extra files, so the worker's model_dir holds model.pth and code/ again.
    subprocess.run([str(torchserve_python.parent / "torch-model-archiver"), "--model-name", TORCHSERVE_MODEL,
                    "--version", "1.0", "--handler", str(TORCHSERVE_FILES / "sagemaker_handler.py"),
                    "--extra-files", str(handler_dir), "--export-path", str(store), "--force"],
                   check=True, timeout=300)
    return Prepared(handler_dir, artifact_dir, store)


def import_handlers(folder: Path) -> ModuleType:
    """The folder's code/inference.py as a fresh module (each plain-loop start imports it anew)."""
    spec = importlib.util.spec_from_file_location(f"handler_bench_inference_{time.monotonic_ns()}",
                                                  folder / "code" / "inference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PlainLoop:
    """The handlers called in this process, one request after another, with every core."""

    def __init__(self, folder: Path) -> None:
        torch.set_num_threads(os.cpu_count() or 1)
        self.handlers = import_handlers(folder)
        self.model = self.handlers.model_fn(str(folder))

    def invoke(self, body: bytes, stages: dict[str, float] | None = None) -> str:
        h, started = self.handlers, time.perf_counter()
        data = h.input_fn(body, "image/jpeg")
        decoded = time.perf_counter()
        prediction = h.predict_fn(data, self.model)
        predicted = time.perf_counter()
        answer = h.output_fn(prediction, "application/json")
        if stages is not None:
            finished = time.perf_counter()
            stages.update(input_fn=(decoded - started) * 1000, predict_fn=(predicted - decoded) * 1000,
                          output_fn=(finished - predicted) * 1000, total=(finished - started) * 1000)
        return answer

    def run(self, bodies: Sequence[bytes], warmup_s: float, duration_s: float, max_requests: int = 20_000) -> LoadResult:
        """Like :func:`loadgen.run_load` at concurrency 1: requests finished inside the window count."""
        result = LoadResult(1, duration_s)
        window_opens = time.perf_counter() + warmup_s
        window_closes = window_opens + duration_s
        for number in range(max_requests):
            if time.perf_counter() >= window_closes:
                break
            stages: dict[str, float] = {}
            started = time.perf_counter()
            self.invoke(bodies[number % len(bodies)], stages)
            finished = time.perf_counter()
            if window_opens <= finished <= window_closes:
                result.latencies_s.append(finished - started)
                result.timings.append(stages)
        return result

    def close(self) -> None:
        self.model = None
        torch.set_num_threads(1)  # back to sending requests only: the cores go to the servers


@dataclass
class Running:
    """A started system: where to send requests (None: the plain loop) and what it reported."""

    system: System
    url: str | None
    details: dict[str, Any]
    loop: PlainLoop | None = None

    def answer(self, body: bytes) -> Answer:
        """Top-5 class indices and probabilities for one photo."""
        if self.loop is not None:
            payload: Any = json.loads(self.loop.invoke(body))
        else:
            assert self.url is not None
            response = httpx.post(self.url, content=body, headers={"Content-Type": "image/jpeg"}, timeout=120)
            if response.status_code != 200:
                raise RuntimeError(f"{name(self.system)} answered {response.status_code}: {response.text[:500]}")
            payload = response.json()
        if isinstance(payload, dict):  # our built-in answer: {"predictions": [{"label", "index", "probability"}]}
            top = payload["predictions"]
            return [p["index"] for p in top], [p["probability"] for p in top]
        return payload[0]["indices"], payload[0]["probabilities"]

    def measure(self, bodies: Sequence[bytes], concurrency: int, warmup_s: float, duration_s: float) -> LoadResult:
        if self.loop is not None:
            return self.loop.run(bodies, warmup_s, duration_s)
        assert self.url is not None
        return run_load(self.url, bodies, concurrency=concurrency, warmup_s=warmup_s, duration_s=duration_s)


@contextlib.contextmanager
def started(system: System, prepared: Prepared, image: str, home: Path, torchserve_python: Path) -> Iterator[Running]:
    """One system, running and ready until the block ends."""
    begin = time.monotonic()
    if system.kind == "loop":
        loop = PlainLoop(prepared.handler_dir)
        try:
            yield Running(system, None, {"seconds_to_ready": round(time.monotonic() - begin, 1),
                                         "torch_threads": torch.get_num_threads()}, loop)
        finally:
            loop.close()
    elif system.kind == "ours":
        folder = prepared.artifact_dir if system.serves == "built-in" else prepared.handler_dir
        options = [argument for key, value in system.env for argument in ("-e", f"{key}={value}")]
        with serving(image, *options, "-v", f"{folder}:/opt/ml/model:ro") as served:
            url = direct_url(served.container) or served.url
            yield Running(system, f"{url}/invocations", {
                "env": dict(system.env), "container": served.container[:12],
                "seconds_to_ready": round(served.seconds_to_ready, 1),
                "reached_at": "container address" if url != served.url else "published port",
                "ping_round_trip_ms": ping_round_trip_ms(f"{url}/ping")})
    else:
        assert system.torchserve is not None
        instance = TorchServe(torchserve_python, system.torchserve, TORCHSERVE_MODEL, prepared.torchserve_store, home)
        try:
            instance.wait_ready()
            yield Running(system, instance.url, asdict(system.torchserve) | {
                "seconds_to_ready": round(time.monotonic() - begin, 1),
                "worker_torch_threads": instance.worker_threads(),
                "ping_round_trip_ms": ping_round_trip_ms(f"http://127.0.0.1:{instance.ports[0]}/ping")})
        finally:
            instance.stop()


# --- the overhead at concurrency 1, side by side -------------------------------------------------------


class LeanClient:
    """HTTP/1.1 POSTs over one kept-alive socket: what the measurement adds to a request is a few
    microseconds of Python, not an HTTP library's work."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.path = parsed.path or "/"
        self.sock = socket.create_connection((parsed.hostname, parsed.port or 80), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def post(self, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytes]:
        head = (f"POST {self.path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.sock.sendall(head + body)
        status = int(self.reader.readline().split()[1])
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, headers, self.reader.read(int(headers.get("content-length", 0)))

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def side_by_side_overhead(prepared: Prepared, image: str, bodies: Sequence[bytes], pairs: int) -> dict[str, Any]:
    """The plain loop and our handler server (default settings) taking turns, ``pairs`` times."""
    system = next(s for s in SYSTEMS if s.label == "ours handler")
    loop = PlainLoop(prepared.handler_dir)
    try:
        with serving(image, "-v", f"{prepared.handler_dir}:/opt/ml/model:ro") as served:
            url = direct_url(served.container) or served.url
            client = LeanClient(f"{url}/invocations")
            try:
                plain, server, handlers = [], [], []
                for number in range(pairs + 10):  # the first ten of each warm up
                    body = bodies[number % len(bodies)]
                    started = time.perf_counter()
                    loop.invoke(body)
                    plain_ms = (time.perf_counter() - started) * 1000
                    started = time.perf_counter()
                    status, headers, payload = client.post(body, "image/jpeg")
                    server_ms = (time.perf_counter() - started) * 1000
                    if status != 200:
                        raise RuntimeError(f"{name(system)} answered {status}: {payload[:300]!r}")
                    if number >= 10:
                        timing = parse_server_timing(headers.get("server-timing"))
                        plain.append(plain_ms)
                        server.append(server_ms)
                        handlers.append(timing.get("handlers", math.nan) + timing.get("queue", 0.0))
            finally:
                client.close()
    finally:
        loop.close()
    outside = [total - inside for total, inside in zip(server, handlers)]
    return {"pairs": pairs, "client": "one kept-alive socket, request bytes prepared (LeanClient)",
            "plain_loop_p50_ms": round(percentile(plain, 50), 2), "ours_handler_p50_ms": round(percentile(server, 50), 2),
            "overhead_p50_ms": round(percentile(server, 50) - percentile(plain, 50), 2),
            "server_outside_handlers_p50_ms": round(percentile(outside, 50), 2),
            "handler_thread_p50_ms": round(percentile(handlers, 50), 2)}  # the wait for the thread included


# --- the checks before measuring ----------------------------------------------------------------------


class WrongAnswer(RuntimeError):
    """A system's answer differs from the plain loop's: the systems do not compute the same thing."""


def compare(running: Running, photo: str, seen: Answer, reference: Answer) -> None:
    """Raises unless ``seen`` has the plain loop's top-1 class and (for the handler systems, which run
    the same code on the same weights) its probability too: the photos' top-1 probabilities differ
    enough that a request answered with another request's rows fails this."""
    if seen[0][0] != reference[0][0]:
        raise WrongAnswer(f"{name(running.system)} answers {photo} with class {seen[0][0]} ({seen[1][0]:.4f}) "
                          f"where the plain loop answers {reference[0][0]} ({reference[1][0]:.4f})")
    if running.system.serves == "handler" and abs(seen[1][0] - reference[1][0]) > 0.01:
        raise WrongAnswer(f"{name(running.system)} gives {photo} class {seen[0][0]} probability {seen[1][0]:.4f}, "
                          f"the plain loop {reference[1][0]:.4f}, from the same inference.py and weights")


def check_answers(running: Running, references: list[Answer], bodies: Sequence[bytes]) -> dict[str, Any]:
    """Each photo alone, then (servers only) 8 requests at once, so that a server that batches them
    must give each request its own rows back. Returns what the first photo got alone."""
    first = running.answer(bodies[0])
    for index, body in enumerate(bodies):
        compare(running, PHOTOS[index], first if index == 0 else running.answer(body), references[index])
    together = 0
    if running.url is not None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            indices = [number % len(bodies) for number in range(8)]
            for index, seen in zip(indices, pool.map(running.answer, [bodies[i] for i in indices])):
                compare(running, PHOTOS[index], seen, references[index])
        together = len(indices)
    return {"top5": first[0], "probabilities": [round(p, 5) for p in first[1]], "checked_at_once": together}


def image_knows_batching(container: str) -> bool:
    """Whether the server in ``container`` has the handler-batching switch at all (else it ignores it)."""
    code = (f"import pathlib, serve; print(any({BATCHING_SWITCH!r} in p.read_text() "
            "for p in pathlib.Path(serve.__file__).parent.glob('*.py')))")
    return docker("exec", container, "python", "-c", code, check=False).stdout.strip() == "True"


def container_versions(container: str) -> str:
    code = "import torch, torchvision, PIL; print(torch.__version__, torchvision.__version__, PIL.__version__)"
    result = docker("exec", container, "python", "-c", code, check=False)
    return result.stdout.strip() or result.stderr.strip()[-200:]


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    system: str
    settings: str
    concurrency: int
    round: int
    throughput: float
    latencies_ms: list[float]
    errors: int = 0
    error_example: str = ""
    batch_sizes: list[float] = field(default_factory=list)  # from Server-Timing, where the server sends it
    stages_ms: list[dict[str, float]] = field(default_factory=list)  # the plain loop's input/predict/output


def run_all(plan: Plan, prepared: Prepared, image: str, scratch: Path, torchserve_python: Path,
            bodies: list[bytes], details: dict[str, Any]) -> list[Measurement]:
    with started(SYSTEMS[0], prepared, image, scratch, torchserve_python) as loop:
        references = [loop.answer(body) for body in bodies]
    details["reference_answers"] = {photo: {"top5": indices, "probabilities": [round(p, 5) for p in probabilities]}
                                    for photo, (indices, probabilities) in zip(PHOTOS, references)}
    measurements = []
    for round_ in range(1, plan.rounds + 1):
        for number, system in (enumerate(SYSTEMS) if round_ % 2 else reversed(list(enumerate(SYSTEMS)))):
            home = scratch / f"torchserve-{number}-round-{round_}"
            with started(system, prepared, image, home, torchserve_python) as running:
                about = details.setdefault("systems", {}).setdefault(name(running.system), {})
                about.setdefault("starts", []).append(running.details)
                about["answer"] = check_answers(running, references, bodies)
                if system.kind == "ours" and "container_versions" not in details:
                    details["container_versions"] = container_versions(running.details["container"])
                if system.env and "image_knows_handler_batching" not in details:
                    details["image_knows_handler_batching"] = image_knows_batching(running.details["container"])
                for concurrency in system.concurrencies:
                    load = running.measure(bodies, concurrency, plan.warmup_s[concurrency], plan.duration_s)
                    result = Measurement(system.label, system.settings, concurrency, round_, load.throughput,
                                         [s * 1000 for s in load.latencies_s], load.errors, load.error_example,
                                         [t["batch"] for t in load.timings if "batch" in t],
                                         load.timings if system.kind == "loop" else [])
                    measurements.append(result)
                    print(f"round {round_} {name(system):52} c={concurrency}: {result.throughput:6.1f}/s"
                          f"  p50 {percentile(result.latencies_ms, 50):7.1f} ms  p99 {percentile(result.latencies_ms, 99):7.1f} ms"
                          + (f"  errors {result.errors}: {result.error_example}" if result.errors else ""), flush=True)
    return measurements


# --- summaries ----------------------------------------------------------------------------------------


def summarise(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """One row per (system, settings, concurrency): median throughput, pooled percentiles."""
    groups: dict[tuple[str, str, int], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.system, m.settings, m.concurrency), []).append(m)
    rows = []
    for (system, settings, concurrency), runs in groups.items():
        latencies = [value for run in runs for value in run.latencies_ms]
        batches = [value for run in runs for value in run.batch_sizes]
        stages = [stage for run in runs for stage in run.stages_ms]
        row = {"system": system, "settings": settings, "concurrency": concurrency,
               "throughput": round(statistics.median(run.throughput for run in runs), 2),
               "throughput_runs": [round(run.throughput, 2) for run in runs],
               "p50_ms": round(percentile(latencies, 50), 2), "p99_ms": round(percentile(latencies, 99), 2),
               "p50_ms_runs": [round(percentile(run.latencies_ms, 50), 2) for run in runs],
               "requests": len(latencies), "errors": sum(run.errors for run in runs),
               "error_example": next((run.error_example for run in runs if run.error_example), ""),
               "mean_batch": round(statistics.fmean(batches), 2) if batches else None}
        if stages:
            row["stages_median_ms"] = {key: round(statistics.median(stage[key] for stage in stages), 2)
                                       for key in stages[0]}
        rows.append(row)
    return rows


def find(rows: list[dict[str, Any]], system: str, concurrency: int, settings: str | None = None) -> dict[str, Any] | None:
    chosen = [row for row in rows if row["system"] == system and row["concurrency"] == concurrency
              and row["requests"] and (settings is None or row["settings"] == settings)]
    return max(chosen, key=lambda row: row["throughput"]) if chosen else None


def checks(rows: list[dict[str, Any]], details: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    side = details.get("overhead_side_by_side")
    check_a = "(a) handler overhead, c=1, side by side: ours handler p50 - plain loop p50"
    if side:
        gap = side["overhead_p50_ms"]
        found.append({"check": check_a, "goal": f"<= {OVERHEAD_GOAL_MS:g} ms", "met": gap <= OVERHEAD_GOAL_MS,
                      "value": f"{gap:+.2f} ms ({side['ours_handler_p50_ms']:.1f} vs {side['plain_loop_p50_ms']:.1f} "
                               f"ms over {side['pairs']} turns each; in the server: the handler thread "
                               f"{side['handler_thread_p50_ms']:.1f} ms, everything else "
                               f"{side['server_outside_handlers_p50_ms']:.2f} ms)"})
    else:
        found.append({"check": check_a, "goal": f"<= {OVERHEAD_GOAL_MS:g} ms", "met": False,
                      "value": "not measured (the side-by-side run did not complete)"})
    ours1, loop1 = find(rows, "ours handler", 1), find(rows, "plain loop", 1)
    if ours1 and loop1:
        per_round = [round(a - b, 1) for a, b in zip(ours1["p50_ms_runs"], loop1["p50_ms_runs"])]
        found.append({"check": "(a') the same from the table: ours handler c=1 p50 - plain loop p50 (load "
                               "generator's client, runs minutes apart)", "goal": "comparison", "met": None,
                      "value": f"{ours1['p50_ms'] - loop1['p50_ms']:+.1f} ms ({ours1['p50_ms']:.1f} vs "
                               f"{loop1['p50_ms']:.1f} ms; per round {per_round})"})
    batched8, builtin8 = find(rows, "ours handler batched", 8), find(rows, "ours built-in", 8)
    if batched8 and builtin8:
        ratio = batched8["throughput"] / builtin8["throughput"]
        note = "" if details.get("image_knows_handler_batching") else \
            f"; this image has no {BATCHING_SWITCH}: batched runs as unbatched"
        found.append({"check": "(b) c=8 throughput: ours handler batched / ours built-in",
                      "goal": f">= {BATCHED_GOAL:g}", "met": ratio >= BATCHED_GOAL,
                      "value": f"{ratio:.2f}x ({batched8['throughput']:.1f} vs {builtin8['throughput']:.1f}/s){note}"})
    for concurrency in CONCURRENCIES:
        ours, torchserve = find(rows, "ours handler", concurrency), find(rows, "TorchServe + same handler", concurrency)
        if ours and torchserve:
            found.append({"check": f"(c) c={concurrency}: ours handler vs best TorchServe + same handler "
                                   f"({torchserve['settings']})", "goal": "comparison", "met": None,
                          "value": f"{ours['throughput'] / torchserve['throughput']:.2f}x throughput "
                                   f"({ours['throughput']:.1f} vs {torchserve['throughput']:.1f}/s), p50 "
                                   f"{ours['p50_ms']:.0f} vs {torchserve['p50_ms']:.0f} ms, p99 "
                                   f"{ours['p99_ms']:.0f} vs {torchserve['p99_ms']:.0f} ms"})
    return found


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| system | settings | c=1 req/s | c=1 p50 ms | c=1 p99 ms | c=8 req/s | c=8 p50 ms | c=8 p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for system in SYSTEMS:
        by_c = {row["concurrency"]: row for row in rows
                if row["system"] == system.label and row["settings"] == system.settings}
        if not by_c:
            continue

        def cells(row: dict[str, Any] | None) -> str:
            if row is None or not row["requests"]:
                return "– | – | –"
            return f"{row['throughput']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f}"

        errors = sum(row["errors"] for row in by_c.values())
        lines.append(f"| {system.label} | {system.settings} | {cells(by_c.get(1))} | {cells(by_c.get(8))} | {errors} |")
    return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
    plan, m = result["plan"], result["machine"]
    lines = [
        "# Handler mode under load: ResNet-50 through a SageMaker-style inference.py",
        "",
        f"Run {result['when']} ({'quick smoke run, ' if result['quick'] else ''}{result['wall_clock_s']} s wall clock) "
        f"with `bench/handler_load.py`: image `{result['image']['tag']}` ({result['image']['id'][:19]}), "
        f"{m['cores']} cores ({m['cpu']}), load average {m['load_average_at_start'][0]:.2f} at start. "
        f"{plan['rounds']} round(s), {plan['duration_s']:g} s measured per point after "
        f"{plan['warmup_s']['1']:g} s (c=1) / {plan['warmup_s']['8']:g} s (c=8) of warm-up; throughput is the "
        "median over rounds, latency percentiles pool them.",
        "",
        result["table_markdown"],
        "",
        *(f"- {'met' if c['met'] else 'MISSED' if c['met'] is False else '–'}: {c['check']} (goal {c['goal']}): "
          f"{c['value']}" for c in result["checks"]),
        "",
        "Mean batch (Server-Timing, where the server sends it): " + (", ".join(
            f"{row['system']} c={row['concurrency']}: {row['mean_batch']:g}" for row in result["summary"]
            if row["mean_batch"] is not None) or "none sent") + ".",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items() if v)}; in the image: "
        f"torch, torchvision, Pillow {result['details'].get('container_versions', '?')}. The image "
        f"{'has' if result['details'].get('image_knows_handler_batching') else 'does not have'} "
        f"`{BATCHING_SWITCH}`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=os.environ.get("CLASSIFIER_IMAGE_CPU"),
                        help="our CPU image (default: $CLASSIFIER_IMAGE_CPU)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, a few seconds per point")
    parser.add_argument("--duration", type=float, help="seconds measured per system and concurrency (default 20)")
    parser.add_argument("--rounds", type=int, help="rounds over all systems (default 2; --quick: 1)")
    parser.add_argument("--output", type=Path, default=RESULTS / "handler_load.json",
                        help="the JSON file; the markdown report is written beside it (.md)")
    args = parser.parse_args()
    image_id = image_under_test(parser, args.image)
    plan = make_plan(args.quick, args.duration, args.rounds)
    began, clock, load_at_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic(), os.getloadavg()
    print(f"handler_load: {len(SYSTEMS)} systems x {plan.rounds} round(s), about "
          f"{plan.estimate_s(SYSTEMS) / 60:.0f} minutes", flush=True)
    torch.set_num_threads(1)  # this process sends requests; the plain loop takes every core while it runs
    bodies = photo_bodies()
    torchserve_python = torchserve_venv()
    details: dict[str, Any] = {}
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="handler-load-") as scratch_dir:
        scratch = Path(scratch_dir)
        prepared = prepare(scratch, torchserve_python)
        measurements = run_all(plan, prepared, args.image, scratch, torchserve_python, bodies, details)
        details["overhead_side_by_side"] = side_by_side_overhead(prepared, args.image, bodies,
                                                                 30 if args.quick else OVERHEAD_PAIRS)
        print(f"side by side, c=1: {details['overhead_side_by_side']}", flush=True)
    rows = summarise(measurements)
    result: dict[str, Any] = {
        "when": began, "wall_clock_s": round(time.monotonic() - clock), "quick": args.quick,
        "image": {"tag": args.image, "id": image_id},
        "machine": machine() | {"load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "versions": versions(torchserve_python), "plan": asdict(plan),
        "photos": {photo: len(body) for photo, body in zip(PHOTOS, bodies)},
        "details": details, "summary": rows, "checks": checks(rows, details),
        "runs": [{key: value for key, value in asdict(m).items() if key not in ("latencies_ms", "stages_ms", "batch_sizes")}
                 | {"requests": len(m.latencies_ms), "p50_ms": round(percentile(m.latencies_ms, 50), 2),
                    "p99_ms": round(percentile(m.latencies_ms, 99), 2)} for m in measurements],
    }
    result["table_markdown"] = markdown_table(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    report = markdown_report(json.loads(json.dumps(result, default=str)))  # the plan's keys as the JSON has them
    args.output.with_suffix(".md").write_text(report)
    print("\n" + report)
    print(f"wrote {args.output} and {args.output.with_suffix('.md')} in {time.monotonic() - clock:.0f} s")


if __name__ == "__main__":
    main()
