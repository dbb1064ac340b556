"""Imbalanced classification: the tuned decision threshold (``classification.threshold``),
document-grouped validation (``data.group_field``), focal loss, and a quiet ``predict``."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peftlab.api import evaluate, predict
from peftlab.cli import main
from peftlab.config import ConfigError, from_dict
from peftlab.data.readers import DataError
from peftlab.evaluation.metrics import tune_threshold
from peftlab.tasks.classification.predict import load_classifier
from peftlab.tasks.classification.task import focal_loss, read_classification_rows
from peftlab.training.recipe import run_training
from tests.test_classification import _cfg, _synthetic, _write_jsonl, tiny_bert_dir  # noqa: F401

# ----------------------------------------------------------------------------- tune_threshold


def test_threshold_maximises_f1_of_hand_computed_cuts():
    # sorted by score: gold 1 0 1 | 0 0. Cutting after k rows gives positive-class F1
    # k=1: 2/3, k=2: 1/2, k=3: 4/5 (tp 2, fp 1), k=4: 2/3, k=5: 4/7 -> k=3, halfway 0.7..0.1
    scores = [0.1, 0.9, 0.05, 0.7, 0.8]
    gold = [0, 1, 0, 1, 0]
    threshold, f1 = tune_threshold(scores, gold, "f1")
    assert threshold == pytest.approx(0.4)
    assert f1 == pytest.approx(0.8)
    on_tensor = tune_threshold(torch.tensor(scores), gold, "f1")  # float32 scores
    assert on_tensor == (pytest.approx(0.4), pytest.approx(0.8))


def test_threshold_ties_prefer_the_one_nearest_one_half():
    # accuracy: k=1 (threshold 0.85) and k=3 (threshold 0.4) both get 4/5; 0.4 is nearer 0.5
    threshold, acc = tune_threshold([0.9, 0.8, 0.7, 0.1, 0.05], [1, 0, 1, 0, 0], "accuracy")
    assert (threshold, acc) == (pytest.approx(0.4), pytest.approx(0.8))


def test_threshold_never_splits_equal_scores():
    # the two 0.6s (one positive, one negative) fall on the same side of any threshold
    threshold, f1 = tune_threshold([0.6, 0.6, 0.2], [1, 0, 0], "f1")
    assert threshold == pytest.approx(0.4) and f1 == pytest.approx(2 / 3)
    # every score equal and all negative: "predict nothing" (threshold above them) is best
    threshold, acc = tune_threshold([0.3, 0.3], [0, 0], "accuracy")
    assert threshold > 0.3 and acc == 1.0


def test_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="binary gold"):
        tune_threshold([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="unknown threshold metric"):
        tune_threshold([0.1], [1], "auc")
    with pytest.raises(ValueError, match="2 scores but 1 gold"):
        tune_threshold([0.1, 0.2], [1])


# ----------------------------------------------------------------------------- focal loss


def test_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    p = logits.softmax(-1)[torch.arange(3), labels]
    expected = sum(-((1 - float(q)) ** 2) * math.log(float(q)) for q in p)
    assert focal_loss(logits, labels, 2.0).item() == pytest.approx(expected, rel=1e-6)
    weight = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(focal_loss(logits, labels, 0.0, weight),
                               F.cross_entropy(logits, labels, weight=weight, reduction="sum"))


# ----------------------------------------------------------------------------- config keys


def _raw(**classification) -> dict:
    return {"model": "m", "task": "classification",
            "data": {"train": "t.jsonl", "validation_split": 0.2},
            "classification": classification}


@pytest.mark.parametrize(("classification", "message"), [
    ({"threshold": "autoo"}, "did you mean 'auto'"),
    ({"threshold": 1.5}, "probability in \\(0, 1\\)"),
    ({"threshold_metric": "f2"}, "threshold_metric"),
    ({"loss": "focall"}, "did you mean 'focal'"),
    ({"focal_gamma": -1}, "focal_gamma must be >= 0"),
    ({"treshold": "auto"}, "did you mean 'threshold'"),
])
def test_bad_threshold_keys_are_one_clear_error(classification, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(_raw(**classification))


def test_group_field_is_checked():
    with pytest.raises(ConfigError, match="group_field only applies to task: classification"):
        from_dict({"model": "m", "task": "sft", "data": {"train": "t", "group_field": "doc"}})
    with pytest.raises(ConfigError, match="group_field must be a field name"):
        from_dict({**_raw(), "data": {"train": "t", "group_field": " "}})
    with pytest.raises(ConfigError, match="did you mean 'group_field'"):
        from_dict({**_raw(), "data": {"train": "t", "groupfield": "doc"}})


# ----------------------------------------------------------------------------- group_field


def _grouped_rows(n_docs: int = 10) -> list[dict]:
    rows = []
    for d in range(n_docs):
        for i, r in enumerate(_synthetic(8 + d, seed=d)):
            rows.append({**r, "doc": f"doc{d}", "line": i})
    return rows


def test_grouped_validation_keeps_each_document_on_one_side(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", _grouped_rows())
    cfg = from_dict({"model": "m", "task": "classification",
                     "data": {"train": str(path), "group_field": "doc",
                              "validation_split": 0.25}})
    rows, val_rows, labels, report = read_classification_rows(cfg)
    train_docs, val_docs = {r.group for r in rows}, {r.group for r in val_rows}
    assert train_docs and val_docs and not train_docs & val_docs
    assert train_docs | val_docs == {f"doc{d}" for d in range(10)}
    assert report["validation_groups"] == sorted(val_docs)
    assert len(rows) + len(val_rows) == sum(8 + d for d in range(10))
    assert 0.15 < len(val_rows) / (len(rows) + len(val_rows)) < 0.35


def test_missing_group_names_the_file_and_row(tmp_path):
    rows = _grouped_rows(3)
    del rows[4]["doc"]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = from_dict({"model": "m", "task": "classification",
                     "data": {"train": str(path), "group_field": "doc",
                              "validation_split": 0.3}})
    with pytest.raises(DataError, match=r"train.jsonl:5: group field 'doc' .* is missing"):
        read_classification_rows(cfg)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def threshold_run(tiny_bert_dir, tmp_path_factory):  # noqa: F811
    """A tiny classifier trained with ``threshold: auto`` (imbalanced: 1 positive in 4)."""
    d = tmp_path_factory.mktemp("threshold")
    rows = [r for i, r in enumerate(_synthetic(320, 0)) if r["label"] == "neg" or i % 6 == 1]
    val = [r for i, r in enumerate(_synthetic(96, 1)) if r["label"] == "neg" or i % 6 == 1]
    train_path = _write_jsonl(d / "train.jsonl", rows)
    val_path = _write_jsonl(d / "val.jsonl", val)
    cfg = from_dict(_cfg(tiny_bert_dir, train_path, d / "run", validation=val_path,
                         classification={"threshold": "auto"},
                         train={"epochs": 1, "eval_every": 4, "best_metric": "val_f1_pos"}))
    summary = run_training(cfg, progress=False)
    return cfg, summary, val_path


def test_auto_threshold_is_tuned_on_validation_and_saved(threshold_run):
    cfg, summary, val_path = threshold_run
    meta = json.loads((summary.adapter_dir / "labels.json").read_text())
    assert meta["threshold_metric"] == "f1"
    clf = load_classifier(summary.adapter_dir)
    assert clf.task.threshold == meta["threshold"]
    result = predict(summary.adapter_dir, val_path)
    p_pos = [p["probabilities"]["pos"] for p in result["predictions"]]
    gold = [int(p["gold"] == "pos") for p in result["predictions"]]
    expected, _ = tune_threshold(p_pos, gold, "f1")
    assert meta["threshold"] == pytest.approx(expected, abs=1e-5)  # probabilities are rounded
    lines = (summary.output_dir / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(x) for x in lines]
    assert any("val_threshold" in r for r in history)


def test_saved_threshold_decides_predict_and_eval(threshold_run, tmp_path):
    cfg, summary, val_path = threshold_run
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in summary.adapter_dir.iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    meta = json.loads((adapter / "labels.json").read_text())
    probs = [p["probabilities"]["pos"]
             for p in predict(adapter, val_path)["predictions"]]
    cut = sorted(probs)[len(probs) // 2]  # a threshold far from the tuned one: half positive
    meta["threshold"] = cut
    (adapter / "labels.json").write_text(json.dumps(meta))
    result = predict(adapter, val_path)
    assert result["threshold"] == cut
    assert [p["prediction"] for p in result["predictions"]] == [
        "pos" if p["probabilities"]["pos"] >= cut else "neg" for p in result["predictions"]]
    assert sum(p["prediction"] == "pos" for p in result["predictions"]) >= len(probs) // 2
    report = evaluate(cfg, adapter=adapter)["adapter"]["report"]
    assert report["decision"]["threshold"] == cut
    n_pos = sum(row[1] for row in report["confusion_matrix"])
    assert n_pos == sum(p["prediction"] == "pos" for p in result["predictions"])


def test_predict_loads_quietly(threshold_run, capsys, caplog):
    """transformers reports the new head as MISSING (its handler writes to the stderr of
    import time, so the log records are what is checked); predict restores it, quietly."""
    _, summary, val_path = threshold_run
    caplog.set_level(logging.WARNING)
    assert main(["predict", "--adapter", str(summary.adapter_dir), "--input", str(val_path),
                 "--output", str(summary.output_dir / "preds.jsonl")]) == 0
    out, err = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "LOAD REPORT" not in out + err + logged and "MISSING" not in out + err + logged
    assert "decision threshold" in out


def test_threshold_auto_needs_validation_and_two_classes(tiny_bert_dir, tmp_path):  # noqa: F811
    path = _write_jsonl(tmp_path / "train.jsonl", _synthetic(16, 0))
    cfg = from_dict(_cfg(tiny_bert_dir, path, tmp_path / "run",
                         classification={"threshold": "auto"}))
    with pytest.raises(ConfigError, match="tunes the threshold on validation data"):
        run_training(cfg, progress=False)
    three = [{**r, "label": ["a", "b", "c"][i % 3]} for i, r in enumerate(_synthetic(30, 0))]
    path3 = _write_jsonl(tmp_path / "three.jsonl", three)
    cfg = from_dict(_cfg(tiny_bert_dir, path3, tmp_path / "run3",
                         data={"validation_split": 0.3}, classification={"threshold": "auto"}))
    with pytest.raises(ConfigError, match="applies to binary classification"):
        run_training(cfg, progress=False)
    assert not Path(tmp_path / "run3" / "config.yaml").exists()  # checked before writing


# ----------------------------------------------------------------------------- one-pass validation


@pytest.mark.parametrize("options", [{"class_weights": [0.6, 2.5], "tune_threshold": True},
                                     {"loss": "focal", "focal_gamma": 2.0}])
def test_validation_loss_and_metrics_come_from_one_forward(threshold_run, options):
    """The Trainer's validation (task.validate) equals the loss pass + metrics it replaces,
    with one forward per batch instead of two."""
    from peftlab.data.classification import build_examples, read_labelled
    from peftlab.evaluation.loss import evaluate_loss
    from peftlab.tasks.classification.task import make_encoder, task_from_meta

    _, summary, val_path = threshold_run
    clf = load_classifier(summary.adapter_dir)
    task = task_from_meta(clf.meta, clf.tokenizer, **options)
    rows, _ = read_labelled(str(val_path), "text", None, "label")
    examples, _ = build_examples(rows, task.labels, make_encoder(clf.meta, clf.tokenizer))
    calls = []
    hook = clf.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        loss, metrics = task.validate(clf.model, examples, 16, "fp32")
        one_pass = len(calls)
        expected_loss = evaluate_loss(clf.model, task, examples, 16, "fp32")
        expected = task.metrics(clf.model, examples, 16, "fp32")
    finally:
        hook.remove()
    assert one_pass == math.ceil(len(examples) / 16) and len(calls) == 3 * one_pass
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert metrics == expected
    assert ("threshold" in metrics) == options.get("tune_threshold", False)
