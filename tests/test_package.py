"""``classifier-deploy package``: state dicts, TorchScript and ONNX files made into served artifacts."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from classifier import artifact
from classifier.export import GRAPH_FILE
from classifier.models import create_model
from deploy.cli import main
from serve.predictor import Predictor

from imagedata import CLASSES, render

NAMES = tuple(CLASSES)


def image() -> Image.Image:
    import random

    return render("circle", random.Random(0), 96)


def logits_of(model: torch.nn.Module, predictor: Predictor) -> tuple[torch.Tensor, torch.Tensor]:
    batch = predictor.preprocess(image())[None]
    with torch.no_grad():
        return model.eval()(batch), torch.from_numpy(predictor.infer(batch))


def package(tmp_path: Path, *args: str, capsys=None) -> int:
    return main(["package", "--classes", ",".join(NAMES), "--output", str(tmp_path / "model"), *args], environ={})


def test_a_checkpoint_of_a_torchvision_model_becomes_an_artifact_with_the_same_answers(tmp_path: Path, capsys) -> None:
    """A training loop's checkpoint: the state dict under "model", saved from DDP ("module." names)."""
    torch.manual_seed(0)
    model = create_model("resnet18", len(NAMES))
    torch.save({"epoch": 7, "model": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "checkpoint.pth")
    assert package(tmp_path, "--architecture", "resnet18", "--weights", str(tmp_path / "checkpoint.pth"),
                   "--image-size", "64") == 0
    out = capsys.readouterr().out
    assert f"model.tar.gz: {tmp_path / 'model.tar.gz'}" in out and "sample -> " in out
    predictor = Predictor.load(tmp_path / "model", allow_default=False, device="cpu")
    assert predictor.class_names == NAMES and predictor.input_shape == (3, 64, 64)
    expected, served = logits_of(model, predictor)
    torch.testing.assert_close(served, expected, rtol=1e-3, atol=1e-3)
    with tarfile.open(tmp_path / "model.tar.gz") as archive:
        # A state dict's artifact carries its checked ONNX graph, which the server runs on a CPU.
        assert sorted(archive.getnames()) == [GRAPH_FILE, artifact.MANIFEST_FILE, artifact.WEIGHTS_FILE]


def test_safetensors_and_timm_architectures(tmp_path: Path) -> None:
    model = create_model("timm/resnet10t", len(NAMES))
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    assert package(tmp_path, "--architecture", "timm/resnet10t", "--weights", str(tmp_path / "weights.safetensors"),
                   "--image-size", "64") == 0
    predictor = Predictor.load(tmp_path / "model", allow_default=False, device="cpu")
    expected, served = logits_of(model, predictor)
    torch.testing.assert_close(served, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_torchscript_file_becomes_an_artifact_with_the_same_answers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("mobilenet_v3_small", len(NAMES)).eval()
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    assert package(tmp_path, "--torchscript", str(tmp_path / "scripted.pt"), "--image-size", "96",
                   "--tarball", str(tmp_path / "out" / "shapes.tar.gz")) == 0
    manifest = artifact.load_manifest(tmp_path / "model")
    assert manifest.architecture == artifact.TORCHSCRIPT
    predictor = Predictor.load(tmp_path / "model", allow_default=False, device="cpu")
    expected, served = logits_of(model, predictor)
    torch.testing.assert_close(served, expected, rtol=1e-3, atol=1e-3)
    with tarfile.open(tmp_path / "out" / "shapes.tar.gz") as archive:
        assert sorted(archive.getnames()) == [artifact.MANIFEST_FILE, artifact.TORCHSCRIPT_FILE]


def export_onnx(model: torch.nn.Module, path: Path, size: int, *, batch: int | None = None) -> Path:
    """``model`` exported as users export it: any batch size, or a fixed one (``batch``)."""
    example = (torch.randn(batch or 2, 3, size, size),)
    dynamic = None if batch else ({0: torch.export.Dim("batch")},)
    torch.onnx.export(model.eval(), example, str(path), dynamo=True, dynamic_shapes=dynamic, verbose=False)
    return path


@pytest.mark.parametrize("batch", [None, 2])
def test_an_onnx_file_becomes_an_artifact_with_the_same_answers_at_its_own_size(tmp_path: Path, capsys,
                                                                                batch: int | None) -> None:
    """The image size comes from the network; a network exported for a fixed batch of two still
    answers one image, or three."""
    torch.manual_seed(2)
    model = create_model("resnet18", len(NAMES)).eval()
    export_onnx(model, tmp_path / "shapes.onnx", 80, batch=batch)
    assert package(tmp_path, "--onnx", str(tmp_path / "shapes.onnx")) == 0
    assert "(ONNX Runtime)" in capsys.readouterr().out
    manifest = artifact.load_manifest(tmp_path / "model")
    assert manifest.architecture == artifact.ONNX and manifest.preprocessing.crop_size == 80
    predictor = Predictor.load(tmp_path / "model", allow_default=False, device="cpu")
    assert predictor.onnx and predictor.input_shape == (3, 80, 80)
    expected, served = logits_of(model, predictor)
    torch.testing.assert_close(served, expected, rtol=1e-3, atol=1e-3)
    three = torch.stack([predictor.preprocess(image())] * 3)
    assert predictor.infer(three).shape == (3, len(NAMES))
    with tarfile.open(tmp_path / "model.tar.gz") as archive:
        assert sorted(archive.getnames()) == [artifact.MANIFEST_FILE, artifact.ONNX_FILE]


@pytest.mark.parametrize(("make", "args", "message"), [
    (lambda d: torch.save(create_model("resnet18", 1000).state_dict(), d / "w.pth"),
     ["--architecture", "resnet18", "--weights", "{d}/w.pth"],
     "fc.weight (1000, 512) (expected (3, 512))"),
    (lambda d: torch.save(create_model("resnet18", 3).state_dict(), d / "w.pth"),
     ["--architecture", "resnet50", "--weights", "{d}/w.pth"], "do not fit resnet50 with 3 classes"),
    (lambda d: torch.save({"not": "tensors", "fn": print}, d / "w.pth"),
     ["--architecture", "resnet18", "--weights", "{d}/w.pth"], "is not a state dict of tensors"),
    (lambda d: (d / "w.pt").write_bytes(b"garbage"), ["--torchscript", "{d}/w.pt"], "is not a TorchScript file"),
    (lambda d: (d / "w.onnx").write_bytes(b"garbage"), ["--onnx", "{d}/w.onnx"], "is not an ONNX model"),
    (lambda d: export_onnx(create_model("resnet18", 3), d / "w.onnx", 64), ["--onnx", "{d}/w.onnx", "--image-size",
                                                                             "96"], "takes 64×64 images"),
    (lambda d: export_onnx(create_model("resnet18", 5), d / "w.onnx", 64), ["--onnx", "{d}/w.onnx"],
     "answers (5,) scores per image but the manifest names 3 classes"),
    (lambda d: None, ["--architecture", "resnet-50", "--weights", "{d}/none.pth"], "unknown architecture"),
    (lambda d: None, ["--weights", "{d}/w.pth"], "--weights needs --architecture"),
])
def test_inputs_that_cannot_work_are_refused_with_the_reason(tmp_path: Path, capsys, make, args: list[str],
                                                            message: str) -> None:
    make(tmp_path)
    assert package(tmp_path, *(arg.format(d=tmp_path) for arg in args)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.tar.gz").exists()


def test_an_existing_artifact_is_never_overwritten(tmp_path: Path, capsys) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    torch.save(create_model("resnet18", 3).state_dict(), tmp_path / "w.pth")
    assert package(tmp_path, "--architecture", "resnet18", "--weights", str(tmp_path / "w.pth")) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"
