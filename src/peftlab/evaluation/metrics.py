"""Classification metrics in plain Python: confusion matrix, accuracy, precision/recall/F1.

Conventions (those of scikit-learn with ``zero_division=0``): a ratio whose denominator is
zero is 0, never NaN, so a class that is never predicted has precision 0 and F1 0. Macro
averages are over the classes that occur in the gold labels or in the predictions; a class
absent from both (possible in a small validation split) says nothing and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Labels = Sequence[int] | torch.Tensor


def _as_list(values: Labels) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def confusion_matrix(gold: Labels, pred: Labels, num_classes: int) -> list[list[int]]:
    """``m[g][p]`` = how many examples of gold class ``g`` were predicted as ``p``."""
    gold, pred = _as_list(gold), _as_list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for g, p in zip(gold, pred, strict=True):
        if not (0 <= g < num_classes and 0 <= p < num_classes):
            raise ValueError(f"class id out of range [0, {num_classes}): gold {g}, predicted {p}")
        matrix[g][p] += 1
    return matrix


def per_class_scores(matrix: list[list[int]]) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of every class, from a confusion matrix."""
    n = len(matrix)
    out = []
    for c in range(n):
        tp = matrix[c][c]
        predicted = sum(matrix[g][c] for g in range(n))
        support = sum(matrix[c])
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        out.append({"precision": precision, "recall": recall,
                    "f1": _ratio(2 * precision * recall, precision + recall),
                    "support": support, "predicted": predicted})
    return out


def accuracy(gold: Labels, pred: Labels) -> float:
    gold, pred = _as_list(gold), _as_list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return _ratio(sum(g == p for g, p in zip(gold, pred, strict=True)), len(gold))


def classification_report(gold: Labels, pred: Labels, labels: list[str]) -> dict[str, Any]:
    """Everything in one JSON-ready dict: accuracy, macro P/R/F1, per-class scores, matrix."""
    matrix = confusion_matrix(gold, pred, len(labels))
    scores = per_class_scores(matrix)
    present = [s for s in scores if s["support"] or s["predicted"]]

    def macro(key: str) -> float:
        return _ratio(sum(s[key] for s in present), len(present))

    total = sum(map(sum, matrix))
    return {
        "examples": total,
        "accuracy": _ratio(sum(matrix[c][c] for c in range(len(labels))), total),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "labels": list(labels),
        "per_class": {label: scores[i] for i, label in enumerate(labels)},
        "confusion_matrix": matrix,  # rows: gold label, columns: predicted label
    }
