"""``classification.ensemble: tfidf``: the pickle-free TF-IDF + logistic regression equals
scikit-learn's own, and a trained classifier's predictions are the mean of both members."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from peftlab.api import predict
from peftlab.config import ConfigError, from_dict
from peftlab.files import CorruptFileError
from peftlab.tasks.classification.predict import load_classifier
from peftlab.tasks.classification.tfidf import TFIDF_WEIGHTS, TfidfModel, make_vectorizer
from peftlab.training.recipe import run_training
from tests.test_classification import _cfg, _synthetic, _write_jsonl, tiny_bert_dir  # noqa: F401

TEXTS = ["We may terminate your account at any time.", "Welcome to our service!",
         "Disputes go to binding arbitration in 2024.", "You agree to the terms by using it.",
         "We are not liable for any damages, 3.5 million or more.", "Contact us by e-mail."]


@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 1, 0], [2, 0, 1, 1, 2, 0]])
def test_proba_equals_scikit_learn(labels):
    n_classes = len(set(labels))
    ours = TfidfModel.fit(TEXTS, labels, n_classes)
    vec = make_vectorizer()
    ref = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000, random_state=0,
                             solver="liblinear" if n_classes == 2 else "lbfgs")
    ref.fit(vec.fit_transform(TEXTS), labels)
    unseen = ["the arbitration clause", "nothing known here", TEXTS[0]]
    expected = torch.tensor(ref.predict_proba(vec.transform(unseen)), dtype=torch.float32)
    torch.testing.assert_close(ours.proba(unseen), expected)


def test_save_load_round_trip_and_missing_file(tmp_path):
    model = TfidfModel.fit(TEXTS, [1, 0, 1, 1, 1, 0], 2)
    model.save(tmp_path)
    torch.testing.assert_close(TfidfModel.load(tmp_path).proba(TEXTS), model.proba(TEXTS))
    (tmp_path / TFIDF_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CorruptFileError, match="tfidf.safetensors: not a readable safetensors"):
        TfidfModel.load(tmp_path)
    (tmp_path / TFIDF_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="tfidf.safetensors: missing"):
        TfidfModel.load(tmp_path)


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="at least two classes"):
        TfidfModel.fit(TEXTS[:2], [1, 1], 2)


def test_bad_ensemble_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="classification.ensemble"):
        from_dict({"model": "x", "task": "classification", "data": {"train": "t.jsonl"},
                   "classification": {"ensemble": "tf-idf"}})


def test_trained_ensemble_predicts_the_mean_of_both_members(tiny_bert_dir, tmp_path):  # noqa: F811
    rows = [r for i, r in enumerate(_synthetic(240, 0)) if r["label"] == "neg" or i % 4 == 1]
    val = _synthetic(64, 1)
    train_path = _write_jsonl(tmp_path / "train.jsonl", rows)
    val_path = _write_jsonl(tmp_path / "val.jsonl", val)
    cfg = from_dict(_cfg(tiny_bert_dir, train_path, tmp_path / "run", validation=val_path,
                         classification={"ensemble": "tfidf", "threshold": "auto"},
                         train={"epochs": 1, "eval_every": 5}))
    summary = run_training(cfg, progress=False)
    adapter = summary.adapter_dir
    assert json.loads((adapter / "labels.json").read_text())["ensemble"] == "tfidf"
    report = json.loads((summary.output_dir / "data_report.json").read_text())
    assert report["ensemble"]["features"] > 0

    clf = load_classifier(adapter)
    texts = [r["text"] for r in val]
    both = clf.predict_proba(texts)
    words = clf.task.tfidf.proba(texts)
    clf.task.tfidf = None
    network = clf.predict_proba(texts)
    torch.testing.assert_close(both, (network + words) / 2)
    assert not torch.allclose(both, network)  # the TF-IDF member changes the answer
    result = predict(adapter, val_path)
    got = torch.tensor([[p["probabilities"][lab] for lab in ("neg", "pos")]
                        for p in result["predictions"]])
    torch.testing.assert_close(got, both, atol=1e-6, rtol=0)
    assert [p["prediction"] for p in result["predictions"]] == [
        "pos" if float(p) >= result["threshold"] else "neg" for p in both[:, 1]]


def test_mean_pooling_reads_the_mean_of_the_real_tokens(tiny_bert_dir, tmp_path):  # noqa: F811
    """``classification.pooling: mean``: logits = classifier(mean of the last hidden states
    over attended tokens), by hand; padding does not change a row's logits; it trains."""
    from peftlab.models import load_model
    from peftlab.tasks.classification.task import task_from_meta

    model, tok = load_model(str(tiny_bert_dir), kind="sequence_classification",
                            labels=["neg", "pos"], quiet=True)
    model.eval()
    meta = {"labels": ["neg", "pos"], "mode": "head", "pooling": "mean", "max_length": 32,
            "text_field": "text", "text_pair_field": None}
    task = task_from_meta(meta, tok)
    short, long = tok("good film")["input_ids"], tok("a rather long and boring film")["input_ids"]
    batch = task.collate([{"input_ids": short, "label": 0}, {"input_ids": long, "label": 1}])
    logits = task.logits(model, batch)
    hidden = model.bert(input_ids=torch.tensor([short])).last_hidden_state[0]
    torch.testing.assert_close(logits[0], model.classifier(hidden.mean(0)))
    alone = task.logits(model, task.collate([{"input_ids": short, "label": 0}]))
    torch.testing.assert_close(logits[0], alone[0])
    cls = task_from_meta(dict(meta, pooling="model"), tok).logits(model, batch)
    assert not torch.allclose(cls, logits)

    rows = _synthetic(160, 0)
    cfg = from_dict(_cfg(tiny_bert_dir, _write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "r",
                         classification={"pooling": "mean"},
                         data={"validation_split": 0.25}, train={"epochs": 2}))
    history = run_training(cfg, progress=False).result.history
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    assert json.loads((tmp_path / "r" / "adapter" / "labels.json").read_text())["pooling"] == "mean"


def test_mean_pooling_is_for_heads():
    with pytest.raises(ConfigError, match="pooling: mean applies to mode: head"):
        from_dict({"model": "x", "task": "classification", "data": {"train": "t.jsonl"},
                   "classification": {"pooling": "mean", "mode": "verbalizer"}})
