"""The runtimes: on a CPU the network runs as its exported ONNX graph in ONNX Runtime, checked
against PyTorch first, from the artifact, the graph cache or a fresh export; a network whose graph
cannot be made or differs runs with PyTorch, with a warning."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from classifier import artifact, export
from classifier.artifact import Manifest, Preprocessing
from classifier.onnx_model import OnnxModel
from classifier.pretrained import default_model
from serve import runtime
from serve.predictor import Predictor
from serve.settings import ConfigError, Settings

from imagedata import encode

MANIFEST = Manifest(architecture="test", class_names=("a", "b", "c"),
                    preprocessing=Preprocessing(crop_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3))
# Real photos shipped with scikit-image, as JPEG, for the built-in ImageNet model.
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


class Small(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class DiffersWhenExported(Small):
    """Computes something else while being exported: the exported graph is not the network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits * 2 if torch.onnx.is_in_onnx_export() else logits


class Unexportable(Small):
    """Branches on a value computed from its input: torch.export cannot follow that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if float(logits.sum()) > 0 else -logits


def weights_file(tmp_path: Path, network: nn.Module) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(network.state_dict(), path)
    return path


def photos() -> list[Image.Image]:
    from skimage import data

    return [Image.open(io.BytesIO(encode(Image.fromarray(getattr(data, name)()), "JPEG", quality=90))).convert("RGB")
            for name in PHOTOS]


def test_the_built_in_model_runs_in_onnx_runtime_with_pytorchs_answers_on_real_photos(tmp_path: Path) -> None:
    model, manifest = default_model()
    reference = Predictor(model, manifest, torch.device("cpu"), jit=False)  # PyTorch as it is
    served = Predictor.load(tmp_path / "empty", allow_default=True, device="cpu", graph_cache=tmp_path / "cache")
    assert served.runtime == runtime.ONNXRUNTIME
    images = photos()
    batch = torch.stack([reference.preprocess(image) for image in images])
    expected, got = reference.infer(batch), served.infer(batch)
    tolerance = export.RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= tolerance
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
    assert served.predict(images[:1], top_k=1)[0][0].label in {"tabby", "tiger cat", "Egyptian cat"}


def test_a_graph_is_exported_once_then_taken_from_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    network, cache = Small(), tmp_path / "cache"
    weights = weights_file(tmp_path, network)
    caplog.set_level(logging.INFO, logger="serve.runtime")
    first = runtime.onnx_engine(network, MANIFEST, artifact_dir=None, weights=weights, cache=cache, threads=1)
    assert first is not None and "graph exported now" in caplog.text
    assert len(list(cache.glob("*.onnx"))) == 1
    caplog.clear()
    again = runtime.onnx_engine(network, MANIFEST, artifact_dir=None, weights=weights, cache=cache, threads=1)
    assert again is not None and "graph from the graph cache" in caplog.text


def test_a_cached_graph_that_differs_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    network, cache = Small(), tmp_path / "cache"
    weights = weights_file(tmp_path, network)
    key = runtime.cache_key(weights, MANIFEST)
    cache.mkdir()
    (cache / f"{key}.onnx").write_bytes(export.export(Small(seed=1), 16))  # another network's graph under this key
    engine = runtime.onnx_engine(network, MANIFEST, artifact_dir=None, weights=weights, cache=cache, threads=1)
    assert engine is not None
    assert "not using the graph cache: it differs from the network" in caplog.text
    batch = export.sample(4, 16, seed=5)
    assert np.allclose(engine(batch), network(batch).detach().numpy(), atol=1e-4)


def test_different_weights_have_different_cache_keys(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = weights_file(tmp_path / "a", Small(seed=0)), weights_file(tmp_path / "b", Small(seed=1))
    assert runtime.cache_key(first, MANIFEST) != runtime.cache_key(second, MANIFEST)


def test_a_cache_that_cannot_be_written_costs_only_the_export(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    caplog.set_level(logging.INFO, logger="serve.runtime")
    engine = runtime.onnx_engine(Small(), MANIFEST, artifact_dir=None, weights=weights_file(tmp_path, Small()),
                                 cache=blocked / "cache", threads=1)
    assert engine is not None
    assert "the exported graph is not cached" in caplog.text


@pytest.mark.parametrize("network", [DiffersWhenExported, Unexportable])
def test_a_network_whose_graph_differs_or_fails_runs_with_pytorch(network: type[nn.Module], tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = runtime.onnx_engine(network(), MANIFEST, artifact_dir=None, weights=None, cache=None, threads=1)
    assert engine is None
    assert "running the network with PyTorch: it could not be run with ONNX Runtime" in caplog.text
    predictor = Predictor.load(save(tmp_path, network(), monkeypatch), allow_default=False, device="cpu")
    assert predictor.runtime in ("torch", "torchscript")
    batch = export.sample(2, 16, seed=3)
    with torch.inference_mode():
        expected = network().eval()(batch).numpy()
    assert np.allclose(predictor.infer(batch), expected, atol=1e-4)


def save(tmp_path: Path, network: nn.Module, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``network`` as an artifact, and artifact.load building the "test" architecture as its class."""
    monkeypatch.setattr(artifact, "create_model", lambda architecture, num_classes: type(network)())
    return artifact.save(tmp_path / "model", network, MANIFEST)


def test_the_artifacts_graph_is_used_and_one_for_other_weights_is_not(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="serve.runtime")
    model_dir = save(tmp_path, Small(), monkeypatch)
    assert export.write_graph(model_dir) == model_dir / export.GRAPH_FILE
    predictor = Predictor.load(model_dir, allow_default=False, device="cpu")
    assert predictor.runtime == runtime.ONNXRUNTIME
    assert "graph from the artifact's graph.onnx" in caplog.text
    caplog.clear()
    artifact.save(model_dir, Small(seed=1), MANIFEST)  # new weights, the old graph left beside them
    predictor = Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=tmp_path / "cache")
    assert predictor.runtime == runtime.ONNXRUNTIME
    assert "not using the artifact's graph.onnx: it differs from the network" in caplog.text
    assert "graph exported now" in caplog.text
    batch = export.sample(2, 16, seed=3)
    with torch.inference_mode():
        assert np.allclose(predictor.infer(batch), Small(seed=1).eval()(batch).numpy(), atol=1e-4)


def test_a_graph_this_user_cached_is_served_without_building_the_network(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """It passed the check when it was stored, under its weights' hash: the next start opens it
    alone (the built-in model starts from the image's baked graph this way)."""
    caplog.set_level(logging.INFO, logger="serve.runtime")
    model_dir, cache = save(tmp_path, Small(), monkeypatch), tmp_path / "cache"
    first = Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert "graph exported now" in caplog.text and first.runtime == runtime.ONNXRUNTIME

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("built the network although the cached graph could be trusted")

    monkeypatch.setattr(artifact, "load", no_network)
    again = Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert "graph from the graph cache (checked when it was stored)" in caplog.text
    batch = export.sample(2, 16, seed=3)
    assert np.allclose(again.infer(batch), first.infer(batch), atol=1e-6)
    again.warm_up()  # the graph still answers one score per class the manifest names


def cached_then_tampered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path, list[Path]]:
    """An artifact whose graph is in the cache, and a record of each time its network is built."""
    model_dir, cache = save(tmp_path, Small(), monkeypatch), tmp_path / "cache"
    Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    (cached,) = cache.glob("*.onnx")
    built: list[Path] = []
    load = artifact.load
    monkeypatch.setattr(artifact, "load", lambda directory, **options: built.append(directory) or load(directory, **options))
    return model_dir, cache, cached, built


def served_like_small(predictor: Predictor) -> bool:
    batch = export.sample(2, 16, seed=3)
    with torch.inference_mode():
        return np.allclose(predictor.infer(batch), Small().eval()(batch).numpy(), atol=1e-4)


def test_a_cached_graph_others_may_have_written_is_checked_against_the_network(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="serve.runtime")
    model_dir, cache, cached, built = cached_then_tampered(tmp_path, monkeypatch)
    cached.write_bytes(export.export(Small(seed=1), 16))  # another network's graph, put there by anyone
    cached.chmod(0o666)
    predictor = Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir]
    assert "against the network: others may write it" in caplog.text
    assert "not using the graph cache: it differs from the network" in caplog.text
    assert served_like_small(predictor)


def test_a_link_in_the_cache_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, cache, cached, built = cached_then_tampered(tmp_path, monkeypatch)
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(export.export(Small(seed=1), 16))
    elsewhere.chmod(0o644)  # trusted itself: only the link is in question
    cached.unlink()
    cached.symlink_to(elsewhere)
    predictor = Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir] and served_like_small(predictor)


def test_a_second_name_for_a_cached_graph_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hard link puts one trusted graph under another key (another model's weights)."""
    model_dir, cache, cached, built = cached_then_tampered(tmp_path, monkeypatch)
    os.link(cached, tmp_path / "second-name.onnx")
    Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir]


def test_a_cache_folder_others_may_write_is_not_trusted_unless_sticky(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, cache, _, built = cached_then_tampered(tmp_path, monkeypatch)
    cache.chmod(0o777)
    Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir]
    cache.chmod(0o1777)  # as /tmp and the image's /opt/graphs: no one replaces another's file
    Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_of_another_user_is_neither_trusted_nor_written(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="serve.runtime")
    model_dir, cache, cached, built = cached_then_tampered(tmp_path, monkeypatch)
    cached.unlink()
    os.chown(cache, 54321, -1)
    Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert "the exported graph is not cached: the graph cache" in caplog.text
    assert list(cache.iterdir()) == []
    cached.write_bytes(export.export(Small(), 16))
    cached.chmod(0o644)
    Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir, model_dir] and "it belongs to user 54321" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_cached_graph_of_another_user_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, cache, cached, built = cached_then_tampered(tmp_path, monkeypatch)
    os.chown(cached, 54321, -1)
    monkeypatch.setattr(runtime.os, "getuid", lambda: 12345)  # neither root nor the file's owner
    os.chown(cache, 12345, -1)
    Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir]


def test_a_cached_graph_for_another_class_count_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, cache, _, built = cached_then_tampered(tmp_path, monkeypatch)
    manifest = artifact.load_manifest(model_dir)
    four = Manifest(architecture=manifest.architecture, class_names=("a", "b", "c", "d"),
                    preprocessing=manifest.preprocessing)
    (model_dir / artifact.MANIFEST_FILE).write_text(json.dumps(four.to_dict()))  # same weights, four names
    predictor = Predictor.load(model_dir, allow_default=False, device="cpu", graph_cache=cache)
    assert built == [model_dir] and "answers 3 classes, the manifest 16×16 and 4" in caplog.text
    with pytest.raises(artifact.ArtifactError, match="manifest names 4 classes"):
        predictor.warm_up()  # (a real artifact fails earlier: its weights do not fit four classes)


def test_the_cache_key_changes_with_the_code_that_builds_networks(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    weights = weights_file(tmp_path, Small())
    makers = runtime.graph_makers()
    assert all(f"{name}=" in makers for name in (*runtime.GRAPH_MAKERS, "classifier"))
    before = runtime.cache_key(weights, MANIFEST)
    monkeypatch.setattr(runtime, "graph_makers", lambda: makers.replace("timm=", "timm=another"))
    assert runtime.cache_key(weights, MANIFEST) != before


def test_an_artifact_graph_that_cannot_run_is_passed_over(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph exported for another crop size fails at its first run: the server exports anew."""
    model_dir = save(tmp_path, Small(), monkeypatch)
    (model_dir / export.GRAPH_FILE).write_bytes(b"not ONNX")
    assert Predictor.load(model_dir, allow_default=False, device="cpu").runtime == runtime.ONNXRUNTIME
    assert "not using the artifact's graph.onnx: it cannot be run" in caplog.text
    caplog.clear()
    fixed = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 3))  # 24×24 inputs only
    (model_dir / export.GRAPH_FILE).write_bytes(export.export(fixed, 24))
    assert Predictor.load(model_dir, allow_default=False, device="cpu").runtime == runtime.ONNXRUNTIME
    assert "not using the artifact's graph.onnx: it cannot be run" in caplog.text


def test_writing_the_graph_never_fails_the_artifact(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = save(tmp_path, Unexportable(), monkeypatch)
    (model_dir / export.GRAPH_FILE).write_bytes(b"an earlier run's graph")
    assert export.write_graph(model_dir) is None
    assert "no graph.onnx in the artifact" in caplog.text
    assert not (model_dir / export.GRAPH_FILE).exists()  # the earlier graph is gone, not kept beside new weights
    assert export.write_graph(tmp_path / "nothing here") is None  # no artifact at all: a warning, no exception


def test_runtime_torch_runs_pytorch_and_an_onnx_artifact_runs_onnx_runtime(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = save(tmp_path, Small(), monkeypatch)
    assert Predictor.load(model_dir, allow_default=False, device="cpu", engine="torch").runtime == "torchscript"
    assert Predictor.load(model_dir, allow_default=False, device="cpu", engine="torch", jit=False).runtime == "torch"
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "source.onnx").write_bytes(export.export(Small(), 16))
    manifest = Manifest(architecture=artifact.ONNX, class_names=MANIFEST.class_names,
                        preprocessing=MANIFEST.preprocessing)
    artifact.save_onnx(onnx_dir / "model", onnx_dir / "source.onnx", manifest)
    assert Predictor.load(onnx_dir / "model", allow_default=False, device="cpu", engine="torch").runtime == "onnxruntime"


def test_each_pass_runs_on_the_session_for_its_thread_count() -> None:
    network = OnnxModel(export.export(Small(), 16), threads=(1, 2))
    assert network.thread_counts == (1, 2)
    narrow, wide = network.session_for(1), network.session_for(2)
    assert narrow is not wide
    assert network.session_for(8) is wide  # the widest that fits
    assert network.session_for(0) is narrow  # the narrowest when none fits
    ran: list[object] = []
    for session in (narrow, wide):
        monkeypatch_run(session, ran)
    batch = export.sample(3, 16, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        by_setting = network(batch)  # the calling thread's torch setting picks the session
        by_argument = network(batch, threads=2)
    finally:
        torch.set_num_threads(before)
    assert ran == [narrow, wide]
    assert np.allclose(by_setting, by_argument, atol=1e-5)
    assert network.weight_bytes == 2 * len(export.export(Small(), 16))


def monkeypatch_run(session: object, ran: list[object]) -> None:
    """Record each run of ``session`` in ``ran`` (ONNX Runtime's session objects take attributes)."""
    original = session.run  # type: ignore[attr-defined]

    def run(*args: object, **kwargs: object) -> object:
        ran.append(session)
        return original(*args, **kwargs)

    session.run = run  # type: ignore[attr-defined]


def test_pass_threads_are_the_lone_and_the_shared_pass_widths() -> None:
    assert Settings(threads_per_worker=2, inference_threads=2).pass_threads() == (1, 2)
    assert Settings(threads_per_worker=1, inference_threads=1).pass_threads() == (1,)
    assert Settings(threads_per_worker=8, inference_threads=2).pass_threads() == (4, 8)


def test_the_runtime_setting_is_checked() -> None:
    assert Settings.from_env({}).runtime == "auto"
    assert Settings.from_env({"CLASSIFIER_RUNTIME": "Torch"}).runtime == "torch"
    with pytest.raises(ConfigError, match="CLASSIFIER_RUNTIME='tensorrt' is invalid: expected one of auto, "
                                          "onnxruntime, torch"):
        Settings.from_env({"CLASSIFIER_RUNTIME": "tensorrt"})
    assert Settings.from_env({"CLASSIFIER_GRAPH_CACHE": "/somewhere"}).graph_cache == Path("/somewhere")
