"""``python -m train`` in-process: a real (tiny) run, and failures the platform's way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from classifier import artifact
from classifier.export import GRAPH_FILE
from serve.predictor import Predictor
from train.__main__ import main

from imagedata import CLASSES, write_shape_splits

FAST = ["--architecture", "resnet18", "--pretrained", "false", "--image-size", "32",
        "--batch-size", "8", "--workers", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shape_splits(tmp_path_factory.mktemp("data"))


def sagemaker_base(tmp_path: Path, dataset: Path, hyperparameters: dict[str, str]) -> Path:
    base = tmp_path / "ml"
    (base / "input" / "config").mkdir(parents=True)
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    shutil.copytree(dataset / "train", base / "input" / "data" / "training")
    shutil.copytree(dataset / "valid", base / "input" / "data" / "validation")
    return base


def test_learns_a_learnable_dataset_and_serves_what_it_evaluated(tmp_path: Path, dataset: Path, capsys) -> None:
    """Fine-tuning the shipped ImageNet EfficientNet-Lite0 for a few epochs separates three
    shape/colour classes; 0.8 is well clear of chance (0.33) yet robust to the seed."""
    argv = ["--train", str(dataset), "--base-dir", str(tmp_path / "ml"), "--epochs", "5",
            "--image-size", "64", "--batch-size", "16", "--learning-rate", "0.01", "--workers", "0"]
    assert main(argv, {}) == 0
    out = capsys.readouterr().out
    assert "metric: validation_accuracy=" in out
    metrics = json.loads((tmp_path / "ml" / "output" / "data" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.8
    assert f"metric: test_accuracy={metrics['test']['accuracy']:.6f}" in out

    # The artifact carries the network as a checked ONNX graph too, which the server runs on a CPU.
    assert (tmp_path / "ml" / "model" / GRAPH_FILE).is_file()
    predictor = Predictor.load(tmp_path / "ml" / "model", allow_default=False, device="cpu")
    assert predictor.manifest.class_names == tuple(sorted(CLASSES))
    assert predictor.runtime == "onnxruntime"
    images, labels = [], []
    for class_name in CLASSES:
        for path in sorted((dataset / "test" / class_name).iterdir()):
            images.append(Image.open(path).convert("RGB"))
            labels.append(class_name)
    predicted = [top[0].label for top in predictor.predict(images, top_k=1)]
    served_accuracy = sum(p == t for p, t in zip(predicted, labels)) / len(labels)
    assert served_accuracy == pytest.approx(metrics["test"]["accuracy"])


def test_sagemaker_layout_with_string_hyperparameters(tmp_path: Path, dataset: Path) -> None:
    base = sagemaker_base(tmp_path, dataset, {"epochs": "1", "pretrained": "false",
                                              "architecture": "resnet18", "image_size": "32",
                                              "batch_size": "8", "workers": "0", "export_graph": "false"})
    (base / "model").mkdir(parents=True, exist_ok=True)
    (base / "model" / GRAPH_FILE).write_bytes(b"an earlier run's graph")
    assert main([], {"SAGEMAKER_BASE_DIR": str(base)}) == 0
    manifest = artifact.load_manifest(base / "model")
    assert manifest.training["hyperparameters"]["epochs"] == 1
    assert manifest.preprocessing.crop_size == 32
    assert not (base / "output" / "failure").exists()
    assert not (base / "model" / GRAPH_FILE).exists()  # export_graph=false: none, and no stale one


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"epochs": "ten"}, "hyperparameter epochs='ten' is not a valid int"),
        ({"epoch": "3"}, "unknown hyperparameter 'epoch'"),
        ({"architecture": "resnet1800"}, "architecture='resnet1800' is not a known architecture"),
        ({"architecture": "resnet18"}, "no pretrained weights are shipped for architecture='resnet18'"),
    ],
)
def test_bad_configuration_fails_with_a_reason(tmp_path: Path, dataset: Path, hyperparameters: dict, message: str) -> None:
    base = sagemaker_base(tmp_path, dataset, hyperparameters)
    assert main([], {"SAGEMAKER_BASE_DIR": str(base)}) != 0
    assert message in (base / "output" / "failure").read_text()
    assert not artifact.is_artifact(base / "model")


def test_mismatched_classes_are_named(tmp_path: Path, dataset: Path) -> None:
    base = sagemaker_base(tmp_path, dataset, {})
    shutil.rmtree(base / "input" / "data" / "validation" / "square")
    (base / "input" / "data" / "validation" / "hexagon").mkdir()
    Image.new("RGB", (8, 8)).save(base / "input" / "data" / "validation" / "hexagon" / "0.png")
    assert main(FAST, {"SAGEMAKER_BASE_DIR": str(base)}) != 0
    reason = (base / "output" / "failure").read_text()
    assert "missing from validation: ['square']" in reason
    assert "only in validation: ['hexagon']" in reason


def test_missing_training_channel(tmp_path: Path) -> None:
    assert main(FAST + ["--base-dir", str(tmp_path)], {}) != 0
    assert "no training data" in (tmp_path / "output" / "failure").read_text()


def test_failure_reason_is_capped_at_1024_characters(tmp_path: Path, dataset: Path) -> None:
    base = sagemaker_base(tmp_path, dataset, {"x" * 2000: "1"})
    assert main([], {"SAGEMAKER_BASE_DIR": str(base)}) != 0
    reason = (base / "output" / "failure").read_text()
    assert len(reason) == 1024
    assert reason.startswith("hyperparameters.json: unknown hyperparameter")


def test_unreadable_images_are_skipped_and_listed_with_the_reports(tmp_path: Path, dataset: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    truncated = (data / "train" / "square" / "000.png").read_bytes()
    (data / "train" / "square" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    assert main(FAST + ["--epochs", "1", "--train", str(data), "--base-dir", str(tmp_path / "ml")], {}) == 0
    output = tmp_path / "ml" / "output" / "data"
    skipped = (output / "skipped_files.txt").read_text().split()
    assert sorted(Path(p).name for p in skipped) == ["broken.png", "truncated.png"]
    for name in ("curves.png", "confusion_matrix.png", "classification_report.json", "metrics.json"):
        assert (output / name).is_file(), name
    report = json.loads((output / "classification_report.json").read_text())
    assert report["num_samples"] == 30  # the test split: 10 per class
    assert json.loads((output / "metrics.json").read_text())["report"]["skipped_files"] == 2


def test_a_class_left_with_no_readable_image_is_an_error(tmp_path: Path, dataset: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(dataset / "train", data)
    for path in (data / "circle").iterdir():
        path.write_bytes(b"garbage")
    assert main(FAST + ["--train", str(data), "--base-dir", str(tmp_path / "ml")], {}) != 0
    assert "training classes with no readable image: ['circle']" in (tmp_path / "ml" / "output" / "failure").read_text()


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "adamw", "--learning-rate", "0.001", "--lr-schedule", "step", "--lr-step-size", "1"],
        ["--warmup-epochs", "1", "--augmentation", "trivialaugment", "--label-smoothing", "0.1"],
        ["--channels-last", "true", "--early-stopping-patience", "1", "--lr-schedule", "constant"],
    ],
)
def test_training_options_run_end_to_end(tmp_path: Path, dataset: Path, extra: list[str]) -> None:
    argv = FAST + ["--epochs", "2", "--train", str(dataset), "--base-dir", str(tmp_path / "ml"), *extra]
    assert main(argv, {}) == 0
    assert artifact.is_artifact(tmp_path / "ml" / "model")


def test_freeze_backbone_trains_only_the_head(tmp_path: Path, dataset: Path) -> None:
    argv = ["--train", str(dataset), "--base-dir", str(tmp_path / "ml"), "--epochs", "1", "--image-size", "32",
            "--batch-size", "16", "--workers", "0", "--freeze-backbone", "true"]
    assert main(argv, {}) == 0
    from classifier.pretrained import efficientnet_lite0_imagenet

    trained, _ = artifact.load(tmp_path / "ml" / "model")
    original = efficientnet_lite0_imagenet().state_dict()
    changed = {k for k, v in trained.state_dict().items()
               if k in original and v.shape == original[k].shape and v.dtype.is_floating_point
               and not torch.equal(v, original[k])}
    # Weights of the backbone are untouched; batch-norm running statistics still adapt.
    assert all(k.endswith(("running_mean", "running_var")) for k in changed), sorted(changed)[:5]


def test_weights_file_initialises_a_torchvision_model(tmp_path: Path, dataset: Path) -> None:
    from classifier.models import create_model

    source = create_model("resnet18", 1000)  # stands in for downloaded ImageNet weights
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    torch.save(source.state_dict(), pretrained / "resnet18-imagenet.pth")
    argv = ["--train", str(dataset), "--base-dir", str(tmp_path / "ml"), "--architecture", "resnet18",
            "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--freeze-backbone", "true", "--learning-rate", "0.001"]
    environ = {"SM_CHANNEL_PRETRAINED": str(pretrained)}
    assert main(argv, environ) == 0
    trained, _ = artifact.load(tmp_path / "ml" / "model")
    assert torch.equal(trained.state_dict()["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
    assert trained.fc.out_features == 3


def test_tensorboard_scalars_and_profiler_trace(tmp_path: Path, dataset: Path) -> None:
    argv = FAST + ["--epochs", "2", "--train", str(dataset), "--base-dir", str(tmp_path / "ml"),
                   "--tensorboard", "true", "--profile-steps", "2"]
    assert main(argv, {}) == 0
    board = tmp_path / "ml" / "output" / "tensorboard"
    assert list(board.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board))
    events.Reload()
    assert {"train/loss", "validation/accuracy", "train/learning_rate"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
    assert list((board / "profile").glob("*.pt.trace.json*"))
