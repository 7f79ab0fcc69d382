"""What a multi-label classifier is judged and tuned by: average precision per class, and the
per-class probability thresholds above which the server answers a label.

Scores are probabilities (sigmoid of the logits) and targets 0/1, both ``(images, classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5  # a class that validation cannot tune (no validation split, or no positive in it)


def _ranked(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one class, at each distinct score from the highest down: that score, and the true and
    false positives of answering every image scored at least that."""
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(targets)[last_of_each_score]
    return scores[last_of_each_score], true_positives, last_of_each_score + 1 - true_positives


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each class's average precision (the area under its precision-recall curve, as a step
    function); NaN for a class with no positive image."""
    result = np.full(targets.shape[1], np.nan)
    for column in range(targets.shape[1]):
        if targets[:, column].sum() == 0:
            continue
        _, true_positives, false_positives = _ranked(scores[:, column], targets[:, column])
        precision = true_positives / (true_positives + false_positives)
        recall = true_positives / true_positives[-1]
        result[column] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return result


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """The mean of the classes' average precisions, over the classes that have a positive image."""
    per_class = average_precision(scores, targets)
    return float(np.nanmean(per_class)) if not np.isnan(per_class).all() else 0.0


def best_thresholds(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per class, the threshold with the best F1: halfway between the lowest score still answered
    and the next one below it (or 0). Of thresholds with equal F1, the highest."""
    thresholds = np.full(targets.shape[1], DEFAULT_THRESHOLD)
    for column in range(targets.shape[1]):
        positives = targets[:, column].sum()
        if positives == 0:
            continue
        distinct, true_positives, false_positives = _ranked(scores[:, column], targets[:, column])
        f1 = 2 * true_positives / (true_positives + false_positives + positives)
        best = int(np.argmax(f1))
        below = distinct[best + 1] if best + 1 < len(distinct) else 0.0
        thresholds[column] = float((distinct[best] + below) / 2)
    return thresholds


def per_class(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray,
              class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Average precision, and precision, recall and F1 of the answers at ``thresholds``, per class."""
    answered = scores >= thresholds
    rows = []
    for column, name in enumerate(class_names):
        hits = float(np.sum(answered[:, column] & (targets[:, column] > 0.5)))
        said, support = float(answered[:, column].sum()), float(targets[:, column].sum())
        precision = hits / said if said else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        ap = average_precision(scores[:, [column]], targets[:, [column]])[0]
        rows.append({"class": name, "threshold": round(float(thresholds[column]), 6),
                     "average_precision": None if np.isnan(ap) else round(float(ap), 6),
                     "precision": round(precision, 6), "recall": round(recall, 6), "f1": round(f1, 6),
                     "support": int(support)})
    return rows
