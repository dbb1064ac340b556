"""Classification metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from peftlab.evaluation.metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    per_class_scores,
)

# Three classes a, b, c; class c is never predicted.
GOLD = [0, 0, 0, 1, 1, 1, 2, 2]
PRED = [0, 1, 0, 1, 1, 0, 1, 0]
# rows = gold, columns = predicted:
#   a: predicted a, b, a  -> [2, 1, 0]
#   b: predicted b, b, a  -> [1, 2, 0]
#   c: predicted b, a     -> [1, 1, 0]
MATRIX = [[2, 1, 0], [1, 2, 0], [1, 1, 0]]


def test_confusion_matrix_by_hand():
    assert confusion_matrix(GOLD, PRED, 3) == MATRIX
    assert confusion_matrix(torch.tensor(GOLD), torch.tensor(PRED), 3) == MATRIX


def test_per_class_scores_by_hand():
    a, b, c = per_class_scores(MATRIX)
    # a: tp 2, predicted 2+1+1 = 4, support 3 -> P 1/2, R 2/3, F1 = 2*(1/2)(2/3)/(1/2+2/3) = 4/7
    assert a["precision"] == pytest.approx(0.5)
    assert a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(4 / 7)
    assert (a["support"], a["predicted"]) == (3, 4)
    # b: tp 2, predicted 1+2+1 = 4, support 3 -> the same numbers
    assert b["f1"] == pytest.approx(4 / 7)
    # c is never predicted: precision 0/0 -> 0, recall 0/2 = 0, F1 0 (not NaN)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
    assert (c["support"], c["predicted"]) == (2, 0)


def test_report_accuracy_and_macro_by_hand():
    r = classification_report(GOLD, PRED, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 8)
    assert r["macro_f1"] == pytest.approx((4 / 7 + 4 / 7 + 0) / 3)  # 8/21
    assert r["macro_precision"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert r["macro_recall"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert r["confusion_matrix"] == MATRIX
    assert r["per_class"]["c"]["f1"] == 0.0
    assert r["examples"] == 8
    assert all(math.isfinite(v) for s in r["per_class"].values() for v in s.values())


def test_class_absent_from_gold_and_predictions_is_left_out_of_macro():
    r = classification_report(GOLD, PRED, ["a", "b", "c", "d"])
    assert r["macro_f1"] == pytest.approx(8 / 21)
    assert r["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0,
                                   "predicted": 0}
    assert r["confusion_matrix"][3] == [0, 0, 0, 0]


def test_predicted_but_absent_class_counts_in_macro():
    # gold only a; predictions a, a, b: b has precision 0 (0 of 1) and F1 0 -> in the macro
    r = classification_report([0, 0, 0], [0, 0, 1], ["a", "b"])
    f1_a = 2 * 1.0 * (2 / 3) / (1.0 + 2 / 3)
    assert r["per_class"]["a"]["f1"] == pytest.approx(f1_a)
    assert r["macro_f1"] == pytest.approx(f1_a / 2)


def test_perfect_and_empty():
    r = classification_report([0, 1, 1], [0, 1, 1], ["x", "y"])
    assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0
    empty = classification_report([], [], ["x", "y"])
    assert empty["accuracy"] == 0.0 and empty["macro_f1"] == 0.0
    assert accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 gold labels but 2 predictions"):
        confusion_matrix([0, 1, 1], [0, 1], 2)
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix([0, 2], [0, 1], 2)
