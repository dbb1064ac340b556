"""Classification metrics in plain Python: confusion matrix, accuracy, precision/recall/F1.

Conventions (those of scikit-learn with ``zero_division=0``): a ratio whose denominator is
zero is 0, never NaN, so a class that is never predicted has precision 0 and F1 0. Macro
averages are over the classes that occur in the gold labels or in the predictions; a class
absent from both (possible in a small validation split) says nothing and is left out.
"""

from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------- thresholds

THRESHOLD_METRICS = ["f1", "macro_f1", "accuracy"]


def _binary_metric(metric: str, tp: int, fp: int, fn: int, tn: int) -> float:
    """``metric`` of a binary confusion matrix (f1: of the positive class), with the
    conventions of :func:`classification_report` (empty ratios are 0; macro over the classes
    present in gold or predictions)."""
    if metric == "accuracy":
        return _ratio(tp + tn, tp + fp + fn + tn)
    f1_pos = _ratio(2 * tp, 2 * tp + fp + fn)
    if metric == "f1":
        return f1_pos
    if metric != "macro_f1":
        raise ValueError(f"unknown threshold metric {metric!r}; choose from {THRESHOLD_METRICS}")
    f1_neg = _ratio(2 * tn, 2 * tn + fn + fp)
    present = [f for f, n in ((f1_pos, tp + fn + fp), (f1_neg, tn + fp + fn)) if n]
    return _ratio(sum(present), len(present))


def tune_threshold(scores: Sequence[float] | torch.Tensor, gold: Labels,
                   metric: str = "f1") -> tuple[float, float]:
    """(threshold, metric value): the decision threshold on ``scores`` (e.g. the positive
    class's probability; predict positive iff score >= threshold) that maximises ``metric``
    against ``gold`` (1 = positive, 0 = negative).

    Every distinct cut of the sorted scores is tried (plus "all negative"); a threshold lies
    halfway between the two scores it separates. Of equally good thresholds the one nearest
    0.5 wins, so a plateau does not push the threshold to an extreme.
    """
    values = ([float(s) for s in scores.reshape(-1).tolist()] if isinstance(scores, torch.Tensor)
              else [float(s) for s in scores])
    labels = _as_list(gold)
    if len(values) != len(labels):
        raise ValueError(f"{len(values)} scores but {len(labels)} gold labels")
    if not values:
        raise ValueError("cannot tune a threshold on no examples")
    if any(g not in (0, 1) for g in labels):
        raise ValueError("tune_threshold needs binary gold labels (0 or 1)")
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"unknown threshold metric {metric!r}; choose from {THRESHOLD_METRICS}")
    order = sorted(range(len(values)), key=lambda i: -values[i])
    s = [values[i] for i in order]
    g = [labels[i] for i in order]
    positives, n = sum(g), len(g)

    def candidate(k: int, tp: int) -> tuple[float, float]:
        if k == 0:
            threshold = math.nextafter(s[0], math.inf)  # nothing reaches it
        elif k == n:
            threshold = s[-1]
        else:
            threshold = (s[k - 1] + s[k]) / 2
            if threshold <= s[k]:  # adjacent floats: the midpoint rounds onto the lower one
                threshold = s[k - 1]
        fp, fn = k - tp, positives - tp
        return threshold, _binary_metric(metric, tp, fp, fn, n - k - fn)

    best = candidate(0, 0)
    tp = 0
    for k in range(1, n + 1):
        tp += g[k - 1]
        if k < n and s[k] == s[k - 1]:
            continue  # equal scores fall on the same side of any threshold
        threshold, value = candidate(k, tp)
        if value > best[1] or (value == best[1] and abs(threshold - 0.5) < abs(best[0] - 0.5)):
            best = (threshold, value)
    return best
