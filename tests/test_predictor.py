"""The predictor with PyTorch: the network frozen with TorchScript on a CPU, and the fallback when it cannot be
(ONNX Runtime, the default on a CPU, is tests/test_runtime.py's)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch import nn

from classifier import artifact
from classifier.artifact import Manifest, Preprocessing
from serve.predictor import Predictor

MANIFEST = Manifest(architecture="test", class_names=("a", "b", "c"),
                    preprocessing=Preprocessing(crop_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3))
CPU = torch.device("cpu")


class Small(nn.Module):
    """Convolution, batch norm, pooling, a linear head: what freezing folds and keeps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.features[1].running_mean.uniform_(-1, 1)  # batch norm that changes something when folded
        self.features[1].running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class ThroughNumpy(Small):
    """Leaves the graph through NumPy: a trace records the result as a constant of its example's batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(super().forward(x).numpy().copy())


class Untraceable(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("cannot be traced")
        return super().forward(x)


def logits(network: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return network.eval()(batch)


@pytest.mark.parametrize("size", [1, 5])
def test_the_frozen_network_answers_like_the_original_at_any_batch_size(size: int) -> None:
    predictor = Predictor(Small(), MANIFEST, CPU)
    assert predictor.jit
    assert isinstance(predictor.model, torch.jit.ScriptModule)
    batch = torch.randn(size, 3, 16, 16)
    assert torch.allclose(torch.from_numpy(predictor.infer(batch)), logits(Small(), batch), atol=1e-5)


def test_freezing_can_be_turned_off() -> None:
    predictor = Predictor(Small(), MANIFEST, CPU, jit=False)
    assert not predictor.jit
    assert not isinstance(predictor.model, torch.jit.ScriptModule)


def test_a_pytorch_pass_runs_with_the_threads_it_is_given() -> None:
    """The scheduler hands each pass its width; PyTorch takes it as the pass thread's setting."""
    seen: list[int] = []

    class Counting(Small):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return super().forward(x)

    predictor = Predictor(Counting(), MANIFEST, CPU, jit=False)

    def passes() -> None:
        torch.set_num_threads(3)
        predictor.infer(torch.randn(1, 3, 16, 16), 1)
        predictor.infer(torch.randn(1, 3, 16, 16), 2)
        predictor.infer(torch.randn(1, 3, 16, 16))  # no width: the thread's setting stays

    thread = threading.Thread(target=passes)  # its own torch setting, not the test runner's
    thread.start()
    thread.join()
    assert seen == [1, 2, 2]


@pytest.mark.parametrize("network", [ThroughNumpy, Untraceable])
def test_a_network_that_does_not_trace_faithfully_runs_as_it_is(network: type[nn.Module],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="serve.predictor"):
        predictor = Predictor(network(), MANIFEST, CPU)
    assert not predictor.jit
    assert "without TorchScript" in caplog.text
    batch = torch.randn(4, 3, 16, 16)
    assert torch.allclose(torch.from_numpy(predictor.infer(batch)), logits(Small(), batch), atol=1e-5)


def test_with_pytorch_the_served_artifact_is_frozen_and_charged_its_weights(tiny_artifact) -> None:  # type: ignore[no-untyped-def]
    network, _ = artifact.load(tiny_artifact)
    predictor = Predictor.load(tiny_artifact, allow_default=False, device="cpu", engine="torch")
    assert predictor.jit and predictor.runtime == "torchscript"
    batch = torch.randn(3, 3, 32, 32)
    assert torch.allclose(torch.from_numpy(predictor.infer(batch)), logits(network, batch), atol=1e-4)
    assert predictor.weight_bytes == sum(t.numel() * t.element_size() for t in [*network.parameters(),
                                                                                 *network.buffers()])


def test_an_empty_or_missing_model_folder_serves_the_built_in_model(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")  # hidden files do not count
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        predictor = Predictor.load(folder, allow_default=True, device="cpu", jit=False)
        assert len(predictor.class_names) == 1000


def test_a_model_packed_one_folder_too_deep_is_refused_with_the_fix(tiny_artifact, tmp_path) -> None:
    """A model.tar.gz with a top-level folder: the artifact lands in /opt/ml/model/<folder>/."""
    model_dir = tiny_artifact.parent
    with pytest.raises(artifact.ArtifactError) as refused:
        Predictor.load(model_dir, allow_default=True, device="cpu")
    assert "holds no model artifact" in str(refused.value)
    assert "it holds: model/" in str(refused.value)
    assert "one folder down, in model/" in str(refused.value)
    assert str(tmp_path) not in str(refused.value)  # names what it found, not where the folder is


def test_a_bare_weights_file_is_not_served_as_imagenet(tmp_path) -> None:
    torch.save(Small().state_dict(), tmp_path / "model.pth")
    (tmp_path / "code").mkdir()
    with pytest.raises(artifact.ArtifactError) as refused:
        Predictor.load(tmp_path, allow_default=True, device="cpu")
    assert "it holds: code/, model.pth" in str(refused.value)
    assert "bare weights file" in str(refused.value)


def test_an_empty_manifest_is_a_load_failure_not_the_built_in_model(tmp_path) -> None:
    (tmp_path / artifact.MANIFEST_FILE).write_text("")
    with pytest.raises(artifact.ArtifactError, match="not valid JSON"):
        Predictor.load(tmp_path, allow_default=True, device="cpu")
