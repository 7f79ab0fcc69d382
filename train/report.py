"""Human-readable reports for the end of a training run.

Metrics printed to stdout feed SageMaker, but people judge a model by its learning curves, its
confusion matrix and its per-class scores. These land in the job's output data folder
(``/opt/ml/output/data``), which SageMaker uploads as ``output.tar.gz``. Plots use matplotlib's
object-oriented API with the Agg canvas only (no pyplot), so no display or global backend state is
involved and rendering is thread-safe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

logger = logging.getLogger(__name__)

MAX_LABELLED_CLASSES = 30  # above this the confusion matrix drops tick labels and cell counts


def write_reports(
    output_dir: Path,
    *,
    class_names: Sequence[str],
    history: Sequence[Mapping[str, Any]],
    test_targets: Sequence[int] | None = None,
    test_predictions: Sequence[int] | None = None,
    skipped_files: Sequence[str] = (),
) -> dict[str, Any]:
    """Write curves, test-set reports and the skipped-file list; return a short summary."""
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty")
    test = _validate_test(len(names), test_targets, test_predictions)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    _save(_curves_figure(history), output_dir / "curves.png")
    files = ["curves.png"]
    summary: dict[str, Any] = {"files": files, "skipped_files": len(skipped_files)}

    if test is not None:
        matrix = _confusion_matrix(*test, len(names))
        _save(_confusion_figure(matrix, names), output_dir / "confusion_matrix.png")
        report = _classification_report(matrix, names)
        text = json.dumps(report, indent=2, allow_nan=False)
        (output_dir / "classification_report.json").write_text(text + "\n", encoding="utf-8")
        files += ["confusion_matrix.png", "classification_report.json"]
        macro = report["macro_avg"]
        summary["test"] = {
            "accuracy": report["accuracy"],
            "macro_precision": macro["precision"],
            "macro_recall": macro["recall"],
            "macro_f1": macro["f1"],
        }

    lines = "".join(f"{path}\n" for path in skipped_files)
    (output_dir / "skipped_files.txt").write_text(lines, encoding="utf-8")
    files.append("skipped_files.txt")
    logger.info("Wrote reports to %s: %s", output_dir, ", ".join(files))
    return summary


def _validate_test(
    num_classes: int, targets: Sequence[int] | None, predictions: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    if targets is None and predictions is None:
        return None
    if targets is None or predictions is None:
        raise ValueError("test_targets and test_predictions must be given together")
    if len(targets) != len(predictions):
        raise ValueError(
            f"length mismatch: {len(targets)} test_targets but {len(predictions)} test_predictions"
        )
    if len(targets) == 0:
        raise ValueError("test_targets and test_predictions are empty")
    return (
        _as_indices("test_targets", targets, num_classes),
        _as_indices("test_predictions", predictions, num_classes),
    )


def _as_indices(name: str, values: Sequence[int], num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a flat sequence of integer class indices")
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{name} has class index {int(bad[0])} out of range for {num_classes} classes"
        )
    return array.astype(np.int64)


def _confusion_matrix(targets: np.ndarray, predictions: np.ndarray, n: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(targets * n + predictions, minlength=n * n).reshape(n, n)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division that yields 0.0 where the denominator is 0 (never NaN)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _classification_report(matrix: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support and macro averages.

    Like scikit-learn, the macro averages cover classes that occur in the targets or the
    predictions, so classes absent from a small test set do not drag the averages to zero.
    """
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    per_class = [
        {
            "class": name,
            "index": i,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    ]
    return {
        "accuracy": float(true_positives.sum() / matrix.sum()),
        "num_samples": int(matrix.sum()),
        "per_class": per_class,
        "macro_avg": {
            "precision": float(precision[present].mean()),
            "recall": float(recall[present].mean()),
            "f1": float(f1[present].mean()),
            "classes": int(present.sum()),
        },
    }


def _series(history: Sequence[Mapping[str, Any]], split: str, metric: str) -> tuple[list, list]:
    epochs, values = [], []
    for position, record in enumerate(history, start=1):
        value = (record.get(split) or {}).get(metric)
        if value is not None:
            epochs.append(record.get("epoch", position))
            values.append(float(value))
    return epochs, values


def _curves_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split in ("train", "validation"):
            epochs, values = _series(history, split, metric)
            if epochs:
                marker = "o" if len(epochs) <= 30 else None  # dots only while they stay apart
                axes.plot(epochs, values, marker=marker, label=split)
        axes.set(title=metric.capitalize(), xlabel="epoch", ylabel=metric)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_lines():
            axes.legend()
    return figure


def _confusion_figure(matrix: np.ndarray, names: list[str]) -> Figure:
    n = len(names)
    labelled = n <= MAX_LABELLED_CLASSES
    side = max(5.0, 0.45 * n + 3.0) if labelled else 14.0
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues", interpolation="nearest")
    ticks = MaxNLocator(integer=True)
    figure.colorbar(image, ax=axes, shrink=0.8, label="count", ticks=ticks)
    axes.set(title="Confusion matrix", xlabel="predicted class", ylabel="true class")
    if labelled:
        axes.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor")
        axes.set_yticks(range(n), names)
        threshold = matrix.max() / 2
        fontsize = 10 if n <= 15 else 7
        for (row, column), count in np.ndenumerate(matrix):
            colour = "white" if count > threshold else "black"
            axes.text(
                column, row, str(count), ha="center", va="center", color=colour, fontsize=fontsize
            )
    else:
        axes.tick_params(labelsize=6)  # numeric index ticks only; names would overlap
    return figure


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    try:
        figure.savefig(path, dpi=100)
    finally:
        figure.clear()
