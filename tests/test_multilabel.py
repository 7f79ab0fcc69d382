"""Multi-label classification (``task=multilabel``): the metrics and thresholds it is judged and
tuned by, manifests holding several labels an image, and a run on generated images whose two
shapes appear independently, served so that an image with both gets both labels."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from test_app import wait_for_ping

from classifier import artifact
from serve.app import create_app
from serve.predictor import Predictor
from serve.settings import Settings
from train import multilabel
from train.__main__ import main
from train.errors import DataError
from train.sources import read_manifest

from imagedata import CLASSES, encode

TAGS = ("circle", "square")
LEARN = ["--task", "multilabel", "--epochs", "5", "--image-size", "64", "--batch-size", "16", "--learning-rate", "0.01"]
IN_PROCESS = [*LEARN, "--workers", "0"]  # no loader processes: quicker for a run this small


def test_average_precision_is_the_area_under_each_class_precision_recall_steps() -> None:
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.5, 0.2], [0.7, 0.1, 0.3], [0.6, 0.2, 0.4]])
    targets = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float)
    ap = multilabel.average_precision(scores, targets)
    # class 0: hits at ranks 1 and 3 -> (1/2)(1) + (1/2)(2/3); class 1: the tie at 0.5 is one step
    # (a hit and a miss: precision 1/2 at recall 1/2), then 0.2 (2/3 at recall 1); class 2 has no positive.
    assert ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert ap[1] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert np.isnan(ap[2])
    assert multilabel.mean_average_precision(scores, targets) == pytest.approx((ap[0] + ap[1]) / 2)


def test_thresholds_are_chosen_for_the_best_f1_of_each_class() -> None:
    scores = np.array([[0.9, 0.2], [0.8, 0.6], [0.3, 0.7], [0.2, 0.1]])
    targets = np.array([[1, 0], [1, 1], [0, 0], [0, 0]], dtype=float)
    thresholds = multilabel.best_thresholds(scores, targets)
    assert thresholds[0] == pytest.approx((0.8 + 0.3) / 2)  # answer the two positives, nothing else
    assert thresholds[1] == pytest.approx((0.6 + 0.2) / 2)  # F1: 0 answering from 0.7, 2/3 from 0.6, 1/2 from 0.2
    table = multilabel.per_class(scores, targets, thresholds, ("a", "b"))
    assert table[0] == {"class": "a", "threshold": 0.55, "average_precision": 1.0, "precision": 1.0,
                             "recall": 1.0, "f1": 1.0, "support": 2}
    assert multilabel.best_thresholds(scores, np.zeros_like(targets)).tolist() == [0.5, 0.5]  # nothing to tune by


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_several_labels_an_image_are_read_from_each_kind_of_manifest(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "a.jsonl", '{"path": "1.png", "labels": ["dog", "cat", "dog"]}\n'
                                        '{"path": "2.png", "labels": []}\n{"path": "3.png", "label": "cat|bird"}\n')
    assert [entry.labels for entry in read_manifest(jsonl, "jsonl", multi_label=True)] == [
        ("cat", "dog"), (), ("bird", "cat")]
    table = write(tmp_path / "a.csv", "path,labels\n1.png,dog; cat\n2.png,\n")
    assert [entry.labels for entry in read_manifest(table, "csv", multi_label=True)] == [("cat", "dog"), ()]
    # A Ground Truth multi-label job's record: class ids, named by the metadata's class-map.
    record = {"source-ref": "s3://b/1.jpg", "tags": [0, 2],
              "tags-metadata": {"class-map": {"0": "dog", "1": "cat", "2": "ball"}, "job-name": "labeling-job/tags",
                                "type": "groundtruth/image-classification-multilabel", "human-annotated": "yes",
                                "confidence-map": {"0": 0.91, "2": 0.87}, "creation-date": "2026-11-02T10:00:00.000000"}}
    manifest = write(tmp_path / "output.manifest", json.dumps(record) + "\n")
    assert [entry.labels for entry in read_manifest(manifest, "jsonl", multi_label=True)] == [("ball", "dog")]
    with pytest.raises(DataError, match="train it with task=multilabel"):
        read_manifest(manifest, "jsonl")
    with pytest.raises(DataError, match=r'a label is a name or a number, not \["dog", "cat"\]'):
        read_manifest(write(tmp_path / "b.jsonl", '{"path": "1.png", "label": ["dog", "cat"]}\n'), "jsonl")


def render(tags: set[str], rng: random.Random, size: int = 64) -> Image.Image:
    """Each tag's shape, if the image has it, in its own half (which half is random)."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(90, 170) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    halves = [0, size // 2]
    rng.shuffle(halves)
    for tag, left in zip(TAGS, halves):
        if tag not in tags:
            continue
        extent = rng.randint(size // 4, size // 2 - 2)
        x0, y0 = left + rng.randint(0, size // 2 - extent), rng.randint(0, size - extent)
        colour = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in CLASSES[tag])
        box = (x0, y0, x0 + extent, y0 + extent)
        (draw.ellipse if tag == "circle" else draw.rectangle)(box, fill=colour)
    return image


def tagged_images(channel: Path, counts: dict[str, int], seed: int) -> None:
    """Images whose tags are drawn independently (each with probability 1/2), listed in a CSV
    manifest with a split column; every split holds each of the four combinations."""
    rng = random.Random(seed)
    combinations = [set(), {"circle"}, {"square"}, {"circle", "square"}]
    rows = []
    for split, count in counts.items():
        for number in range(count):
            tags = combinations[number % 4] if number < 4 else {tag for tag in TAGS if rng.random() < 0.5}
            relative = f"images/{split}-{number:03d}.png"
            (channel / "images").mkdir(parents=True, exist_ok=True)
            render(tags, rng).save(channel / relative)
            rows.append([relative, "|".join(sorted(tags)), split])
    with (channel / "tags.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)


def test_a_multi_label_run_learns_both_tags_and_the_server_answers_both(tmp_path: Path) -> None:
    channel, base = tmp_path / "channel", tmp_path / "ml"
    tagged_images(channel, {"train": 160, "validation": 48, "test": 48}, seed=5)
    assert main(["--train", str(channel), "--base-dir", str(base), *IN_PROCESS], {}) == 0

    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert metrics["test"]["mAP"] >= 0.9, metrics["test"]  # chance is about 0.5 (each tag on half the images)
    assert metrics["per_class"]["split"] == "test"
    assert {row["class"]: row["f1"] >= 0.75 for row in metrics["per_class"]["classes"]} == {"circle": True,
                                                                                           "square": True}
    manifest = artifact.load_manifest(base / "model")
    assert (manifest.task, manifest.class_names, len(manifest.thresholds)) == (artifact.MULTILABEL, TAGS, 2)

    settings = Settings(model_dir=base / "model", default_model=False)
    loader = lambda: Predictor.load(settings.model_dir, allow_default=False, device="cpu")
    rng = random.Random(99)
    with TestClient(create_app(settings, loader), raise_server_exceptions=False) as client:
        wait_for_ping(client, 200)

        def labels(tags: set[str], attributes: str = "") -> list[list[str]]:
            answers = []
            for _ in range(4):
                body = encode(render(tags, rng), "PNG")
                response = client.post("/invocations", content=body, headers={
                    "Content-Type": "image/png", "X-Amzn-SageMaker-Custom-Attributes": attributes})
                assert response.status_code == 200, response.text
                answers.append([p["label"] for p in response.json()["predictions"]])
            return answers

        both = labels({"circle", "square"})
        assert sum(sorted(answer) == ["circle", "square"] for answer in both) >= 3, both
        neither = labels(set())
        assert sum(answer == [] for answer in neither) >= 3, neither
        assert all(len(answer) == 1 for answer in labels(set(), "top_k=1"))  # ranked on request


def test_multi_label_needs_a_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    for tag in TAGS:
        write(folder / tag / "1.png", "")
    base = tmp_path / "ml"
    assert main(["--train", str(folder), "--base-dir", str(base), *IN_PROCESS], {}) == 1
    assert "task=multilabel reads each image's labels from a manifest" in (base / "output" / "failure").read_text()


def test_ties_choose_the_highest_threshold_and_all_positive_answers_everything() -> None:
    # Class 0: F1 2/3 answering from 0.9 (one hit) and 2/3 from 0.1 (two hits, two false): the
    # higher threshold. Class 1: every image is positive, so answering all is best (F1 1).
    scores = np.array([[0.9, 0.3], [0.5, 0.2], [0.4, 0.1], [0.1, 0.3]])
    targets = np.array([[1, 1], [0, 1], [0, 1], [1, 1]], dtype=float)
    thresholds = multilabel.best_thresholds(scores, targets)
    assert thresholds[0] == pytest.approx((0.9 + 0.5) / 2)
    assert thresholds[1] == pytest.approx(0.1 / 2)  # halfway from the lowest score down to 0


@pytest.mark.container
def test_the_image_trains_a_multi_label_model_and_serves_both_labels(tmp_path: Path) -> None:
    """``docker run IMAGE train --task multilabel`` on a manifest, then ``serve`` of its artifact."""
    from containers import classify, docker, image_for, serving

    channel, base = tmp_path / "channel", tmp_path / "ml"
    tagged_images(channel, {"train": 160, "validation": 48, "test": 48}, seed=5)
    base.mkdir()
    run = docker("run", "--rm", "-v", f"{channel}:/data:ro", "-v", f"{base}:/opt/ml", image_for("cpu"),
                 "train", "--train", "/data", *LEARN, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((base / "output" / "data" / "metrics.json").read_text())["test"]["mAP"] >= 0.9
    rng = random.Random(7)
    with serving(image_for("cpu"), "-v", f"{base / 'model'}:/opt/ml/model:ro") as served:
        answers = [sorted(p["label"] for p in classify(served.url, encode(render(set(TAGS), rng), "PNG")))
                   for _ in range(4)]
    assert sum(answer == ["circle", "square"] for answer in answers) >= 3, answers
