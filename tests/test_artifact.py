"""The artifact format: save, load, and the model.tar.gz round trip SageMaker performs."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import pytest
import torch

from classifier import artifact
from classifier.artifact import ArtifactError


def test_round_trip_gives_identical_outputs(tiny_artifact: Path) -> None:
    model, manifest = artifact.load(tiny_artifact)
    again, _ = artifact.load(tiny_artifact)
    batch = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(batch), again(batch))
    assert manifest.class_names == ("circle", "square", "triangle")
    assert manifest.architecture == "resnet18"
    assert manifest.versions["torch"] == torch.__version__
    assert not model.training


def test_weights_survive_save_and_load(tmp_path: Path, tiny_artifact: Path) -> None:
    model, manifest = artifact.load(tiny_artifact)
    artifact.save(tmp_path / "copy", model, manifest)
    copy, copied_manifest = artifact.load(tmp_path / "copy")
    for (name, tensor), (_, other) in zip(model.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(tensor, other), name
    assert copied_manifest == manifest


def test_model_tar_gz_round_trip_with_files_at_the_root(tmp_path: Path, tiny_artifact: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(tiny_artifact.iterdir()):
            tar.add(path, arcname=path.name)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [artifact.MANIFEST_FILE, artifact.WEIGHTS_FILE]
        tar.extractall(tmp_path / "unpacked", filter="data")
    model, _ = artifact.load(tmp_path / "unpacked")
    original, _ = artifact.load(tiny_artifact)
    batch = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(batch), original(batch))


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    assert not artifact.is_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="not a model artifact"):
        artifact.load(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("class_names"), "missing the field 'class_names'"),
        (lambda m: m.update(format_version=99), "unsupported artifact format_version 99"),
        (lambda m: m["preprocessing"].update(mean=[0.5]), "mean must have 3 values"),
        (lambda m: m.update(class_names=["a", "b"]), "do not fit resnet18 with 2 classes"),
        (lambda m: m["preprocessing"].update(crop_size=100_000), "crop_size 100000; it must be 1 to 4096 pixels"),
        (lambda m: m["preprocessing"].update(resize_size=0), "resize_size 0; it must be 1 to 4096 pixels"),
        (lambda m: m.update(training={"padding": "x" * artifact.MAX_MANIFEST_BYTES}), "a manifest is at most"),
        (lambda m: m.update(task="regression"), "task 'regression'; it must be multiclass or multilabel"),
        (lambda m: m.update(task="multilabel", thresholds=[0.5, 0.5, 0.5]), "multilabel manifest has format_version 2"),
        (lambda m: m.update(task="multilabel", thresholds=[0.5], format_version=2), "one threshold from 0 to 1 per class"),
        (lambda m: m.update(task="multilabel", thresholds=[0.5, float("nan"), 0.5], format_version=2),
         "one threshold from 0 to 1 per class"),
    ],
)
def test_malformed_manifests_are_reported(tiny_artifact: Path, edit, message: str) -> None:
    path = tiny_artifact / artifact.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        artifact.load(tiny_artifact)


def test_artifact_files_are_readable_by_every_user(tiny_artifact: Path) -> None:
    # The image's unprivileged server reads what training, run as root, wrote.
    for name in (artifact.MANIFEST_FILE, artifact.WEIGHTS_FILE):
        assert (tiny_artifact / name).stat().st_mode & 0o777 == 0o644


def test_a_manifest_from_before_multi_label_is_single_label(tiny_artifact: Path) -> None:
    path = tiny_artifact / artifact.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for key in ("task", "thresholds"):
        del manifest[key]
    path.write_text(json.dumps(manifest))
    loaded = artifact.load_manifest(tiny_artifact)
    assert (loaded.task, loaded.thresholds, loaded.format_version) == (artifact.MULTICLASS, (), 1)


def test_a_multi_label_artifact_is_version_2_and_a_bad_one_is_never_written(tmp_path: Path, tiny_artifact: Path) -> None:
    model, manifest = artifact.load(tiny_artifact)
    tagged = dataclasses.replace(manifest, task=artifact.MULTILABEL, thresholds=(0.4,) * manifest.num_classes,
                                 format_version=artifact.MULTILABEL_FORMAT_VERSION)
    artifact.save(tmp_path / "ok", model, tagged)
    assert json.loads((tmp_path / "ok" / artifact.MANIFEST_FILE).read_text())["format_version"] == 2
    assert artifact.load_manifest(tmp_path / "ok").thresholds == (0.4,) * manifest.num_classes
    diverged = dataclasses.replace(tagged, thresholds=(float("nan"),) * manifest.num_classes)
    with pytest.raises(ArtifactError, match="one threshold from 0 to 1 per class"):
        artifact.save(tmp_path / "bad", model, diverged)
    assert not (tmp_path / "bad").exists()
