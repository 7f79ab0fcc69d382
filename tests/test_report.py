"""train.report: the PNG plots, the hand-checked classification report and input validation."""

from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from train.report import write_reports

CLASSES = ("cat", "dog", "bird")
# Confusion matrix (rows true, columns predicted): [[2, 1, 0], [1, 2, 0], [0, 1, 1]]
TARGETS = [0, 0, 0, 1, 1, 1, 2, 2]
PREDICTIONS = [0, 0, 1, 1, 1, 0, 2, 1]


def make_history(epochs: int = 3, validation: bool = True) -> list[dict[str, Any]]:
    history = []
    for epoch in range(1, epochs + 1):
        record: dict[str, Any] = {
            "epoch": epoch,
            "train": {"loss": 1.0 / epoch, "accuracy": 0.5 + 0.1 * epoch, "images_per_second": 60.0},
        }
        if validation:
            record["validation"] = {"loss": 1.2 / epoch, "accuracy": 0.4 + 0.1 * epoch,
                                    "top5_accuracy": 1.0}
        history.append(record)
    return history


def assert_png(path: Path, min_width: int = 300, min_height: int = 300) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.verify()
    assert width >= min_width and height >= min_height, (width, height)
    assert width <= 5000 and height <= 5000, (width, height)
    return width, height


def strict_json(path: Path) -> dict[str, Any]:
    """Parse JSON, failing on NaN/Infinity (which json.loads accepts by default)."""
    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant} in {path.name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_full_report_files_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "output" / "data"  # created on demand
    summary = write_reports(
        out, class_names=CLASSES, history=make_history(), test_targets=TARGETS,
        test_predictions=PREDICTIONS, skipped_files=["train/cat/bad.jpg", "valid/dog/empty.png"],
    )
    expected = ["curves.png", "confusion_matrix.png", "classification_report.json",
                "skipped_files.txt"]
    assert sorted(summary["files"]) == sorted(expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert summary["skipped_files"] == 2
    assert assert_png(out / "curves.png", min_height=200)[0] > 600  # two side-by-side panels
    assert_png(out / "confusion_matrix.png")
    lines = (out / "skipped_files.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["train/cat/bad.jpg", "valid/dog/empty.png"]


def test_classification_report_matches_hand_computed_values(tmp_path: Path) -> None:
    summary = write_reports(tmp_path, class_names=CLASSES, history=make_history(),
                            test_targets=TARGETS, test_predictions=PREDICTIONS)
    report = strict_json(tmp_path / "classification_report.json")
    # Column sums (predicted counts) are 3, 4, 1; row sums (support) are 3, 3, 2.
    expected = {
        "cat": (2 / 3, 2 / 3, 2 / 3, 3),
        "dog": (2 / 4, 2 / 3, 4 / 7, 3),   # f1 = 2 * 1/2 * 2/3 / (1/2 + 2/3) = 4/7
        "bird": (1 / 1, 1 / 2, 2 / 3, 2),  # f1 = 2 * 1 * 1/2 / (1 + 1/2) = 2/3
    }
    assert [row["class"] for row in report["per_class"]] == list(CLASSES)
    for row in report["per_class"]:
        precision, recall, f1, support = expected[row["class"]]
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["num_samples"] == 8
    macro = report["macro_avg"]
    assert macro["precision"] == pytest.approx(13 / 18)  # (2/3 + 1/2 + 1) / 3
    assert macro["recall"] == pytest.approx(11 / 18)     # (2/3 + 2/3 + 1/2) / 3
    assert macro["f1"] == pytest.approx(40 / 63)         # (2/3 + 4/7 + 2/3) / 3
    assert summary["test"] == {
        "accuracy": pytest.approx(5 / 8), "macro_precision": pytest.approx(13 / 18),
        "macro_recall": pytest.approx(11 / 18), "macro_f1": pytest.approx(40 / 63),
    }


def test_never_predicted_class_scores_zero_without_nan(tmp_path: Path) -> None:
    # "bird" is never predicted (precision 0/0); "fish" never occurs at all (every ratio 0/0).
    write_reports(tmp_path, class_names=[*CLASSES, "fish"], history=make_history(),
                  test_targets=[0, 1, 2, 2], test_predictions=[0, 1, 1, 1])
    text = (tmp_path / "classification_report.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    report = strict_json(tmp_path / "classification_report.json")
    rows = {row["class"]: row for row in report["per_class"]}
    assert rows["bird"] == {"class": "bird", "index": 2, "precision": 0.0, "recall": 0.0,
                            "f1": 0.0, "support": 2}
    assert rows["fish"]["precision"] == 0.0 and rows["fish"]["support"] == 0
    assert rows["dog"]["precision"] == pytest.approx(1 / 3)
    # The macro average covers the three classes that occur, not the absent "fish".
    assert report["macro_avg"]["classes"] == 3
    assert report["macro_avg"]["precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert report["macro_avg"]["recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert all(math.isfinite(row[key]) for row in rows.values()
               for key in ("precision", "recall", "f1"))


@pytest.mark.parametrize("num_classes", [30, 31, 133])
def test_many_classes_render(tmp_path: Path, num_classes: int) -> None:
    rng = random.Random(num_classes)
    names = [f"{i:03d}.Long_dog_breed_name_number_{i}" for i in range(num_classes)]
    targets = [rng.randrange(num_classes) for _ in range(500)]
    predictions = [t if rng.random() < 0.6 else rng.randrange(num_classes) for t in targets]
    summary = write_reports(tmp_path, class_names=names, history=make_history(),
                            test_targets=targets, test_predictions=predictions)
    assert_png(tmp_path / "confusion_matrix.png", min_width=500, min_height=500)
    report = strict_json(tmp_path / "classification_report.json")
    assert len(report["per_class"]) == num_classes
    assert sum(row["support"] for row in report["per_class"]) == 500
    assert 0.0 < summary["test"]["accuracy"] <= 1.0


def test_history_without_validation(tmp_path: Path) -> None:
    summary = write_reports(tmp_path, class_names=CLASSES, history=make_history(validation=False))
    assert "test" not in summary
    assert summary["files"] == ["curves.png", "skipped_files.txt"]
    assert_png(tmp_path / "curves.png", min_height=200)
    assert not (tmp_path / "confusion_matrix.png").exists()


@pytest.mark.parametrize("history", [[], make_history(epochs=1)], ids=["empty", "one-epoch"])
def test_short_history_still_plots(tmp_path: Path, history: list[dict[str, Any]]) -> None:
    write_reports(tmp_path, class_names=CLASSES, history=history)
    assert_png(tmp_path / "curves.png", min_height=200)


def test_skipped_files_written_even_when_empty(tmp_path: Path) -> None:
    summary = write_reports(tmp_path, class_names=CLASSES, history=make_history())
    assert summary["skipped_files"] == 0
    assert (tmp_path / "skipped_files.txt").read_text(encoding="utf-8") == ""


def test_concurrent_calls_from_threads(tmp_path: Path) -> None:
    def run(i: int) -> list[str]:
        return write_reports(tmp_path / str(i), class_names=CLASSES, history=make_history(),
                             test_targets=TARGETS, test_predictions=PREDICTIONS)["files"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(4)))
    assert all(len(files) == 4 for files in results)
    for i in range(4):
        assert_png(tmp_path / str(i) / "confusion_matrix.png")


@pytest.mark.parametrize(
    ("targets", "predictions", "message"),
    [
        ([0, 1, 2], [0, 1], "length mismatch: 3 test_targets but 2 test_predictions"),
        ([0, 1, 3], [0, 1, 2], "test_targets has class index 3 out of range for 3 classes"),
        ([0, 1, 2], [0, -1, 2], "test_predictions has class index -1 out of range"),
        ([0, 1, 2], None, "must be given together"),
        ([], [], "empty"),
        ([0.0, 1.5], [0, 1], "test_targets must be a flat sequence of integer class indices"),
    ],
    ids=["length", "target-too-big", "negative-prediction", "one-missing", "empty", "floats"],
)
def test_invalid_test_data_raises(tmp_path: Path, targets: Any, predictions: Any,
                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_reports(tmp_path, class_names=CLASSES, history=make_history(),
                      test_targets=targets, test_predictions=predictions)
    assert not (tmp_path / "classification_report.json").exists()


def test_empty_class_names_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class_names is empty"):
        write_reports(tmp_path, class_names=[], history=make_history())
