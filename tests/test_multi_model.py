"""Multi-model mode in-process: SageMaker's /models API, per-model batching, the memory policy."""

from __future__ import annotations

import asyncio
import base64
import collections
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from classifier import artifact
from serve.app import create_app
from serve.batching import Batcher
from serve.memory import model_bytes
from serve.multi_model import MAX_LOAD_BODY
from serve.predictor import Predictor
from serve.registry import ModelRegistry, estimate_bytes
from serve.scheduling import Policy
from serve.settings import MEGABYTE, Settings

from artifacts import constant_artifact
from imagedata import encode

PETS = ("cat", "dog")
COLOURS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    constant_artifact(root / "pets" / "model", PETS, "dog")
    constant_artifact(root / "colours" / "model", COLOURS, "blue")
    return root


class Recorder:
    """Loads predictors the real way and notes every batch each one runs."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: dict[str, list[int]] = collections.defaultdict(list)
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, model_dir: Path) -> Predictor:
        predictor = Predictor.load(model_dir, allow_default=False, device="cpu")
        infer, name = predictor.infer, model_dir.parent.name

        def recorded(batch: torch.Tensor, threads: int | None = None):
            with self.lock:
                self.batches[name].append(len(batch))
            time.sleep(self.delay_s)  # a slower model, so that concurrent requests queue up
            return infer(batch, threads)

        predictor.infer = recorded
        return predictor


def mme_client(load_model=None, **settings: object) -> TestClient:
    settings.setdefault("models_root", Path(tempfile.gettempdir()))  # where pytest's folders are
    app = create_app(Settings(multi_model=True, top_k=1, **settings), load_model=load_model or Recorder())
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with mme_client() as client:
        yield client


def load(client: TestClient, models_dir: Path, name: str, folder: str | None = None):
    return client.post("/models", json={"model_name": name, "url": str(models_dir / (folder or name) / "model")})


def png() -> bytes:
    return encode(Image.new("RGB", (40, 40), "orange"))


def top_label(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


def test_ping_is_ready_with_no_model_loaded(client: TestClient) -> None:
    assert client.get("/ping").status_code == 200
    assert client.get("/models").json() == {"models": []}


def test_two_models_side_by_side_give_their_own_labels(client: TestClient, models_dir: Path) -> None:
    assert load(client, models_dir, "pets").status_code == 200
    assert load(client, models_dir, "colours").status_code == 200
    for _ in range(2):
        assert top_label(client.post("/models/pets/invoke", content=png(), headers={"Content-Type": "image/png"})) == "dog"
        assert top_label(client.post("/models/colours/invoke", content=png(),
                                     headers={"Content-Type": "image/png"})) == "blue"
    # /invocations reaches a model named in SageMaker's target-model header.
    response = client.post("/invocations", content=png(),
                           headers={"Content-Type": "image/png", "X-Amzn-SageMaker-Target-Model": "colours"})
    assert top_label(response) == "blue"
    missing = client.post("/invocations", content=png(), headers={"Content-Type": "image/png"})
    assert missing.status_code == 400 and "/models/<name>/invoke" in missing.json()["error"]["message"]
    unknown = client.post("/invocations", content=png(),
                          headers={"Content-Type": "image/png", "X-Amzn-SageMaker-Target-Model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    described = client.get("/models/pets").json()
    assert described["modelName"] == "pets"
    assert described["modelUrl"] == str(models_dir / "pets" / "model")
    assert described["classes"] == 2 and described["memoryBytes"] > 1_000_000


def test_every_content_type_and_error_works_per_model(client: TestClient, models_dir: Path) -> None:
    load(client, models_dir, "pets")
    instances = {"instances": [{"b64": base64.b64encode(png()).decode()}] * 3}
    response = client.post("/models/pets/invoke", json=instances,
                           headers={"X-Amzn-SageMaker-Custom-Attributes": "top_k=2"})
    assert response.status_code == 200
    assert [[p["label"] for p in row] for row in response.json()["predictions"]] == [["dog", "cat"]] * 3
    csv = client.post("/models/pets/invoke", content=png(), headers={"Content-Type": "image/png", "Accept": "text/csv"})
    assert csv.text.startswith("dog,")
    bad = client.post("/models/pets/invoke", content=b"not an image", headers={"Content-Type": "image/png"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
    unsupported = client.post("/models/pets/invoke", content=b"x", headers={"Content-Type": "text/html"})
    assert unsupported.status_code == 415


def test_unload_then_invoke_is_404_and_double_load_is_409(client: TestClient, models_dir: Path) -> None:
    assert load(client, models_dir, "pets").status_code == 200
    again = load(client, models_dir, "pets")
    assert again.status_code == 409 and again.json()["error"]["code"] == "model_already_loaded"
    assert client.delete("/models/pets").status_code == 200
    gone = client.post("/models/pets/invoke", content=png(), headers={"Content-Type": "image/png"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert client.get("/models/pets").status_code == 404
    assert client.delete("/models/pets").status_code == 404
    # Unloaded, the same name can be loaded again.
    assert load(client, models_dir, "pets").status_code == 200


def test_bad_load_requests_are_400(client: TestClient, models_dir: Path, tmp_path: Path) -> None:
    no_artifact = client.post("/models", json={"model_name": "x", "url": str(tmp_path)})
    assert no_artifact.status_code == 400 and no_artifact.json()["error"]["code"] == "invalid_model"
    shutil.copy(models_dir / "pets" / "model" / artifact.MANIFEST_FILE, tmp_path / artifact.MANIFEST_FILE)
    no_weights = client.post("/models", json={"model_name": "x", "url": str(tmp_path)})
    assert no_weights.status_code == 400 and artifact.WEIGHTS_FILE in no_weights.json()["error"]["message"]
    (tmp_path / artifact.WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    damaged = client.post("/models", json={"model_name": "x", "url": str(tmp_path)})
    assert damaged.status_code == 400 and damaged.json()["error"]["code"] == "invalid_model"
    assert "'x' could not be loaded" in damaged.json()["error"]["message"]
    slash = client.post("/models", json={"model_name": "a/b", "url": str(models_dir / "pets" / "model")})
    assert slash.status_code == 400 and "/" in slash.json()["error"]["message"]
    assert client.post("/models", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    assert client.post("/models", json={"url": str(tmp_path)}).status_code == 400
    assert client.post("/models", json=["x"]).status_code == 400
    bad_page = client.get("/models", params={"page_size": 0})
    assert bad_page.status_code == 400 and "page_size" in bad_page.json()["error"]["message"]
    for token in ("²", "%%%", "-1"):
        assert client.get("/models", params={"next_page_token": token}).status_code == 400, token
    assert client.get("/models").json() == {"models": []}


def test_loads_come_only_from_the_models_root_as_json_of_bounded_size(models_dir: Path) -> None:
    root = models_dir / "pets"
    (root / "escape").symlink_to(models_dir / "colours")
    with mme_client(models_root=root) as client:
        for url in (str(models_dir / "colours" / "model"), str(root / ".." / "colours" / "model"),
                    str(root / "escape" / "model"), "pets/model", "/etc"):
            refused = client.post("/models", json={"model_name": "x", "url": url})
            assert refused.status_code == 403, (url, refused.text)
            assert refused.json()["error"]["code"] == "forbidden" and str(root) in refused.json()["error"]["message"]
        assert load(client, root.parent, "pets").status_code == 200
        as_form = client.post("/models", content=b'{"model_name": "y", "url": "x"}',
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert as_form.status_code == 415 and as_form.json()["error"]["code"] == "unsupported_media_type"
        huge = client.post("/models", content=b" " * (MAX_LOAD_BODY + 1), headers={"Content-Type": "application/json"})
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
        assert [model["modelName"] for model in client.get("/models").json()["models"]] == ["pets"]


def test_list_is_paginated(client: TestClient, models_dir: Path) -> None:
    for name in ("c", "a", "b"):
        assert load(client, models_dir, name, folder="pets").status_code == 200
    first = client.get("/models", params={"page_size": 2}).json()
    assert [m["modelName"] for m in first["models"]] == ["a", "b"]
    second = client.get("/models", params={"page_size": 2, "next_page_token": first["nextPageToken"]}).json()
    assert [m["modelName"] for m in second["models"]] == ["c"]
    assert "nextPageToken" not in second
    # Models coming and going between pages neither skip nor repeat the ones still there.
    assert client.delete("/models/a").status_code == 200
    assert load(client, models_dir, "d", folder="pets").status_code == 200
    again = client.get("/models", params={"page_size": 2, "next_page_token": first["nextPageToken"]}).json()
    assert [m["modelName"] for m in again["models"]] == ["c", "d"]


def test_concurrent_invokes_are_batched_per_model_never_mixed(models_dir: Path) -> None:
    recorder = Recorder(delay_s=0.05)
    with mme_client(recorder) as client:
        load(client, models_dir, "pets")
        load(client, models_dir, "colours")
        recorder.batches.clear()  # forget the warm-up passes
        targets = ["pets", "colours"] * 12

        def invoke(name: str) -> str:
            return top_label(client.post(f"/models/{name}/invoke", content=png(), headers={"Content-Type": "image/png"}))

        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            labels = list(pool.map(invoke, targets))
    assert labels == ["dog", "blue"] * 12
    # Every image a model saw was one of its own requests, and requests were grouped.
    assert sum(recorder.batches["pets"]) == 12 and sum(recorder.batches["colours"]) == 12
    assert max(recorder.batches["pets"]) > 1 and max(recorder.batches["colours"]) > 1


def test_a_budget_too_small_for_two_models_answers_507_without_eviction(models_dir: Path) -> None:
    one = estimate_bytes(models_dir / "pets" / "model")
    with mme_client(model_memory_budget_bytes=one + MEGABYTE, evict_models=False) as client:
        assert load(client, models_dir, "pets").status_code == 200
        refused = load(client, models_dir, "colours")
        assert refused.status_code == 507 and refused.json()["error"]["code"] == "insufficient_memory"
        assert "budget" in refused.json()["error"]["message"]
        assert [m["modelName"] for m in client.get("/models").json()["models"]] == ["pets"]
        assert top_label(client.post("/models/pets/invoke", content=png(), headers={"Content-Type": "image/png"})) == "dog"


def test_a_budget_too_small_for_two_models_evicts_the_least_recently_used(models_dir: Path) -> None:
    # Room for one loaded model and the estimate of a second, not for three.
    weights = (models_dir / "pets" / "model" / artifact.WEIGHTS_FILE).stat().st_size
    with mme_client(model_memory_budget_bytes=estimate_bytes(models_dir / "pets" / "model") + weights * 3 // 2) as client:
        load(client, models_dir, "first", folder="pets")
        load(client, models_dir, "second", folder="colours")
        client.post("/models/first/invoke", content=png(), headers={"Content-Type": "image/png"})  # now "second" is older
        assert load(client, models_dir, "third", folder="pets").status_code == 200
        assert sorted(m["modelName"] for m in client.get("/models").json()["models"]) == ["first", "third"]
        assert client.post("/models/second/invoke", content=png(), headers={"Content-Type": "image/png"}).status_code == 404


def test_measured_free_memory_decides_too(models_dir: Path) -> None:
    # No budget, but a reserve larger than any machine's memory: the measured free memory cannot fit a model.
    with mme_client(memory_reserve_bytes=1 << 50) as client:
        refused = load(client, models_dir, "pets")
        assert refused.status_code == 507
        assert "MB is free" in refused.json()["error"]["message"]


def test_a_model_is_charged_its_tensors(models_dir: Path) -> None:
    network, _ = artifact.load(models_dir / "pets" / "model")
    expected = sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])
    assert model_bytes(network) == expected
    assert (models_dir / "pets" / "model" / artifact.WEIGHTS_FILE).stat().st_size == pytest.approx(expected, rel=0.01)
    # With PyTorch, frozen, the network's tensors are constants rather than parameters: the charge
    # is taken before.
    predictor = Predictor.load(models_dir / "pets" / "model", allow_default=False, device="cpu", engine="torch")
    assert predictor.jit
    assert predictor.weight_bytes == expected
    # In ONNX Runtime (the default on a CPU) each session, one per pass width, holds its own copy.
    predictor = Predictor.load(models_dir / "pets" / "model", allow_default=False, device="cpu", threads=(1, 2))
    assert predictor.runtime == "onnxruntime"
    assert predictor.weight_bytes == pytest.approx(2 * expected, rel=0.05)


def test_a_model_larger_than_the_budget_is_refused_without_unloading_others(models_dir: Path) -> None:
    need = estimate_bytes(models_dir / "pets" / "model")
    with mme_client(model_memory_budget_bytes=need - 1) as client:
        assert load(client, models_dir, "pets").status_code == 507
    with mme_client(model_memory_budget_bytes=need + MEGABYTE) as client:
        assert load(client, models_dir, "pets").status_code == 200
        # A second copy could fit only by unloading the first: it does, that being LRU eviction.
        assert load(client, models_dir, "pets-2", folder="pets").status_code == 200
        assert [m["modelName"] for m in client.get("/models").json()["models"]] == ["pets-2"]


def test_loading_the_same_name_twice_at_once_gives_one_200_and_one_409(models_dir: Path) -> None:
    with mme_client(Recorder(delay_s=0.3)) as client, ThreadPoolExecutor(max_workers=2) as pool:
        statuses = sorted(pool.map(lambda _: load(client, models_dir, "pets").status_code, range(2)))
    assert statuses == [200, 409]


def test_unloading_answers_queued_requests_and_404s_later_ones(models_dir: Path) -> None:
    with mme_client(Recorder(delay_s=0.2)) as client, ThreadPoolExecutor(max_workers=8) as pool:
        load(client, models_dir, "pets")
        invoke = lambda _: client.post("/models/pets/invoke", content=png(), headers={"Content-Type": "image/png"})
        queued = [pool.submit(invoke, n) for n in range(6)]
        time.sleep(0.15)  # all six are decoded and waiting for the (slow) model
        assert client.delete("/models/pets").status_code == 200
        assert [top_label(future.result()) for future in queued] == ["dog"] * 6
        assert invoke(0).status_code == 404


class FakeMemory:
    """Free memory that does not rise when a model is unloaded (freed pages kept by the allocator)."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, device: torch.device) -> int:
        return self.free


def test_eviction_stops_once_the_credited_memory_fits(models_dir: Path) -> None:
    """Three models loaded, memory for about one more: one unload makes room, not all three."""
    need = estimate_bytes(models_dir / "pets" / "model")
    weights = (models_dir / "pets" / "model" / artifact.WEIGHTS_FILE).stat().st_size

    async def scenario() -> list[str]:
        registry = ModelRegistry(load=Recorder(), make_batcher=lambda predictor, name: Batcher(
            predictor.infer, executor, policy=Policy(cores=None, max_batch_size=4), max_queue=16), warm_up=lambda predictor: predictor.warm_up(),
            device=torch.device("cpu"), available=FakeMemory(10 * need))
        for name in ("a", "b", "c"):
            await registry.load(name, str(models_dir / "pets" / "model"))
        registry.get("a")  # b is now the least recently used
        registry._available = FakeMemory(need - weights // 2)  # short by less than one model's footprint
        await registry.load("d", str(models_dir / "colours" / "model"))
        names = [model["modelName"] for model in registry.page(None, 10)[0]]
        await registry.close()
        return names

    with ThreadPoolExecutor(max_workers=1) as executor:
        assert asyncio.run(scenario()) == ["a", "c", "d"]
