"""The classical baseline of ``task: classification``: TF-IDF word 1-2-grams + a linear model.

A fine-tuned transformer that loses to a linear model on bag-of-words features is not worth
its cost, and on small or narrow data sets (legal clauses, support tickets) that happens. So
every classification comparison starts with this row: the same data config (files, fields,
labels, ``validation_split``, ``data.group_field``), no neural network, seconds of CPU.

Texts are lower-cased and every number becomes one token (the recipe of the CLAUDETTE
authors' ``linear_svm.py``). The classifier (linear SVM or logistic regression), its C and
its class weights (none / balanced) are chosen by k-fold cross-validation on the training
rows -- folds grouped by ``data.group_field`` when set, so rows of one document never sit on
both sides, and stratified by class -- scored by ``classification.threshold_metric`` (binary)
or macro-F1. The chosen model is refitted on all training rows and scored on the validation
rows with the same report and metric names (``val_f1_<label>``, ...) as a trained run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config import ConfigError, RunConfig
from peftlab.data.classification import LabelledRow
from peftlab.evaluation.metrics import classification_report
from peftlab.files import check_can_write, write_text_atomic
from peftlab.tasks.classification.task import read_classification_rows
from peftlab.tasks.classification.tfidf import make_vectorizer

BASELINE_FILE = "baseline.json"
MODELS = ("svm", "logreg")
C_VALUES = (0.1, 0.3, 1.0, 3.0)
CLASS_WEIGHTS = (None, "balanced")


@dataclass
class BaselineResult:
    """The chosen model, its cross-validation and its scores on the validation rows."""

    name: str  # e.g. "tfidf+svm"
    params: dict[str, Any]  # model, C, class_weight
    metric: str  # what the cross-validation maximised (f1 = of the positive class)
    cv: dict[str, Any]  # folds, grouped_by, score of the chosen params, every grid point
    train_rows: int
    validation: dict[str, Any] | None  # classification_report on the validation rows
    metrics: dict[str, float] = field(default_factory=dict)  # val_* as a trained run logs them
    seconds: float = 0.0


def _texts(rows: list[LabelledRow]) -> list[str]:
    return [r.joined for r in rows]


def make_classifier(model: str, c: float, class_weight: str | None, seed: int, n_classes: int):
    from sklearn.linear_model import LogisticRegression  # here: ~1.5 s to import (tfidf.py)
    from sklearn.svm import LinearSVC

    if model == "svm":
        return LinearSVC(C=c, class_weight=class_weight, max_iter=5000, random_state=seed)
    # liblinear: ~10x faster than lbfgs on sparse binary problems; it has no multinomial loss
    return LogisticRegression(C=c, class_weight=class_weight, max_iter=2000, random_state=seed,
                              solver="liblinear" if n_classes == 2 else "lbfgs")


def _score(report: dict[str, Any], metric: str, labels: list[str]) -> float:
    if metric == "f1":
        return report["per_class"][labels[1]]["f1"]
    return report[metric]


def selection_metric(cfg: RunConfig, labels: list[str]) -> str:
    """``classification.threshold_metric`` for a binary task (f1 = the positive class's);
    macro-F1 (or accuracy, if asked for) with more classes."""
    chosen = cfg.sections["classification"].threshold_metric
    if len(labels) == 2:
        return chosen
    return "accuracy" if chosen == "accuracy" else "macro_f1"


def _folds(rows: list[LabelledRow], y: list[int], grouped: bool, folds: int,
           seed: int) -> list[tuple[list[int], list[int]]]:
    """(train, test) index lists; fewer folds when there are fewer groups or rows per class."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # ~1.5 s import

    if grouped:
        groups = [r.group for r in rows]
        n = min(folds, len(set(groups)))
        if n < 2:
            return []
        splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
        return [(list(a), list(b)) for a, b in splitter.split(rows, y, groups)]
    n = min(folds, min(y.count(c) for c in set(y)))
    if n < 2:
        return []
    splitter = StratifiedKFold(n_splits=n, shuffle=True, random_state=seed)
    return [(list(a), list(b)) for a, b in splitter.split(rows, y)]


def cross_validate(rows: list[LabelledRow], labels: list[str], metric: str, grouped: bool,
                   folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Mean ``metric`` over the folds for every (model, C, class_weight), best first.

    The vectorizer is fitted on each fold's training part only (no vocabulary or IDF from the
    held-out fold), once per fold and shared by the grid.
    """
    index = {label: i for i, label in enumerate(labels)}
    y = [index[r.label] for r in rows]
    texts = _texts(rows)
    splits = _folds(rows, y, grouped, folds, seed)
    grid = [{"model": m, "C": c, "class_weight": w}
            for m in MODELS for c in C_VALUES for w in CLASS_WEIGHTS]
    scores: list[list[float]] = [[] for _ in grid]
    for train_idx, test_idx in splits:
        vec = make_vectorizer()
        x_train = vec.fit_transform([texts[i] for i in train_idx])
        x_test = vec.transform([texts[i] for i in test_idx])
        y_train, y_test = [y[i] for i in train_idx], [y[i] for i in test_idx]
        if len(set(y_train)) < 2:
            continue  # a fold whose training part has one class says nothing
        for point, bucket in zip(grid, scores, strict=True):
            clf = make_classifier(point["model"], point["C"], point["class_weight"], seed,
                              len(labels))
            pred = clf.fit(x_train, y_train).predict(x_test)
            bucket.append(_score(classification_report(y_test, pred, labels), metric, labels))
    ranked = sorted(
        ({**point, "score": sum(s) / len(s), "fold_scores": [round(v, 5) for v in s]}
         for point, s in zip(grid, scores, strict=True) if s),
        key=lambda p: -p["score"])
    return {"folds": len(splits), "grouped_by_field": grouped, "grid": ranked}


def fit_baseline(rows: list[LabelledRow], val_rows: list[LabelledRow], labels: list[str],
                 metric: str, grouped: bool, folds: int = 5, seed: int = 0) -> BaselineResult:
    """Choose the model by cross-validation on ``rows``, refit it on all of them, score it
    on ``val_rows`` (if any)."""
    started = time.perf_counter()
    cv = cross_validate(rows, labels, metric, grouped, folds, seed)
    params = ({k: cv["grid"][0][k] for k in ("model", "C", "class_weight")} if cv["grid"]
              else {"model": "svm", "C": 1.0, "class_weight": None})  # too few rows for folds
    cv["score"] = cv["grid"][0]["score"] if cv["grid"] else None
    index = {label: i for i, label in enumerate(labels)}
    vec = make_vectorizer()
    clf = make_classifier(params["model"], params["C"], params["class_weight"], seed, len(labels))
    clf.fit(vec.fit_transform(_texts(rows)), [index[r.label] for r in rows])
    report, metrics = None, {}
    if val_rows:
        pred = clf.predict(vec.transform(_texts(val_rows)))
        report = classification_report([index[r.label] for r in val_rows], pred, labels)
        metrics = {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"],
                   **{f"val_f1_{label}": s["f1"] for label, s in report["per_class"].items()}}
    return BaselineResult(f"tfidf+{params['model']}", params, metric, cv, len(rows), report,
                          metrics, time.perf_counter() - started)


def run_baseline(cfg: RunConfig, folds: int = 5, write: bool = True) -> BaselineResult:
    """The baseline on ``cfg``'s classification data; with ``write``, also
    OUTPUT_DIR/baseline.json (checked writable before any work)."""
    if cfg.task != "classification":
        raise ConfigError(f"baseline: the TF-IDF baseline is for task: classification "
                          f"(the config has task: {cfg.task})")
    if folds < 2:
        raise ValueError(f"baseline: folds must be >= 2, got {folds}")
    out = Path(cfg.output_dir) / BASELINE_FILE
    if write:
        check_can_write(out, "output_dir")
    rows, val_rows, labels, _ = read_classification_rows(cfg)
    result = fit_baseline(rows, val_rows, labels, selection_metric(cfg, labels),
                          grouped=cfg.data.group_field is not None, folds=folds,
                          seed=cfg.train.seed)
    if write:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(asdict(result), indent=2) + "\n")
    return result


def describe(result: BaselineResult) -> list[str]:
    """A few lines for the terminal."""
    p = result.params
    weights = p["class_weight"] or "none"
    cv = result.cv
    lines = [f"baseline {result.name} (C={p['C']}, class weights {weights}), chosen by "
             f"{cv['folds']}-fold cross-validation"
             + (" grouped by data.group_field" if cv["grouped_by_field"] else "")
             + f" on {result.train_rows} training rows"
             + (f": {result.metric} {cv['score']:.4f}" if cv["score"] is not None else "")]
    if result.validation is not None:
        v = result.validation
        per_class = ", ".join(f"{label} {s['f1']:.4f}" for label, s in v["per_class"].items())
        lines.append(f"validation ({v['examples']} rows): accuracy {v['accuracy']:.4f}, "
                     f"macro-F1 {v['macro_f1']:.4f}, F1 per class: {per_class}")
    lines.append(f"{result.seconds:.1f} s")
    return lines
