"""The classical baseline (`peftlab baseline`): text normalisation, grouped cross-validation,
a perfect score on separable text, baseline.json, and one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from peftlab.api import baseline
from peftlab.cli import main
from peftlab.config import ConfigError, from_dict
from peftlab.data.classification import LabelledRow
from peftlab.lab.baseline import _folds, cross_validate
from peftlab.lab.sweep import SweepResult, Trial, baseline_row, table
from peftlab.tasks.classification.tfidf import normalize_text

POS = ["refund", "cancel", "terminate", "liability", "arbitration"]
FILLER = ["the", "service", "user", "account", "content", "terms", "these", "we", "may", "your",
          "data", "site", "use", "of", "and", "to"]


def _rows(n_docs: int, per_doc: int, seed: int) -> list[dict]:
    """Separable: a row is positive iff it holds two of the POS words; 1 in 4 is positive."""
    rng = random.Random(seed)
    rows = []
    for d in range(n_docs):
        for i in range(per_doc):
            positive = i % 4 == 0
            words = rng.sample(FILLER, 4) + (rng.sample(POS, 2) if positive else [])
            rng.shuffle(words)
            rows.append({"text": " ".join(words) + f" {rng.randint(1, 999)}",
                         "label": int(positive), "doc": f"doc{seed}-{d}"})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, **data) -> dict:
    train = _write(tmp_path / "train.jsonl", _rows(8, 24, 0))
    return {"model": "unused", "task": "classification",
            "data": {"train": str(train), "group_field": "doc", "validation_split": 0.25,
                     **data},
            "output_dir": str(tmp_path / "out")}


def test_numbers_become_one_token_and_text_is_lower_cased():
    assert normalize_text("Within 30 Days, pay 1,000.50 EUR").split() == [
        "within", "specialnumber", "days,", "pay", "specialnumber", "eur"]


def test_grouped_folds_never_put_a_group_on_both_sides():
    rows = [LabelledRow("f", i, "t", None, str(i % 2), f"g{i % 7}") for i in range(70)]
    y = [i % 2 for i in range(70)]
    folds = _folds(rows, y, grouped=True, folds=5, seed=0)
    assert len(folds) == 5
    held = [i for _, test in folds for i in test]
    assert sorted(held) == list(range(70))  # every row held out exactly once
    for train, test in folds:
        assert not {rows[i].group for i in train} & {rows[i].group for i in test}
    # fewer groups than folds: one fold per group
    assert len(_folds(rows[:21], y[:21], grouped=True, folds=10, seed=0)) == 7


def test_separable_text_scores_perfectly_and_writes_baseline_json(tmp_path):
    result = baseline(_cfg(tmp_path))
    assert result.validation["per_class"]["1"]["f1"] == 1.0
    assert result.metrics["val_f1_1"] == 1.0 and result.metrics["val_macro_f1"] == 1.0
    assert result.cv["grouped_by_field"] and result.cv["folds"] == 5
    assert result.cv["score"] == pytest.approx(1.0)
    assert result.name in ("tfidf+svm", "tfidf+logreg")
    saved = json.loads((tmp_path / "out" / "baseline.json").read_text())
    assert saved["params"] == result.params and saved["metrics"] == result.metrics


def test_cross_validation_scores_noise_below_signal():
    """Labels unrelated to the text must not score like the separable ones (the CV holds
    each fold's rows out of the vectorizer and the classifier)."""
    rows = [LabelledRow("f", i, r["text"], None, str(r["label"]), r["doc"])
            for i, r in enumerate(_rows(8, 24, 1))]
    signal = cross_validate(rows, ["0", "1"], "f1", grouped=True)["grid"][0]["score"]
    rng = random.Random(0)
    for r in rows:
        r.label = rng.choice(["0", "0", "0", "1"])
    noise = cross_validate(rows, ["0", "1"], "f1", grouped=True)["grid"][0]["score"]
    assert signal == pytest.approx(1.0) and noise < 0.6


def test_baseline_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean 'group_field'"):
        from_dict({**_cfg(tmp_path), "data": {"train": "t", "group_fild": "doc"}})
    sft = {"model": "m", "task": "sft", "data": {"train": "t.jsonl"},
           "output_dir": str(tmp_path / "o")}
    (tmp_path / "sft.yaml").write_text(json.dumps(sft))
    assert main(["baseline", str(tmp_path / "sft.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("peftlab baseline: error: baseline: the TF-IDF baseline is for task: "
                   "classification (the config has task: sft)")
    (tmp_path / "c.yaml").write_text(json.dumps(_cfg(tmp_path)))
    assert main(["baseline", str(tmp_path / "c.yaml"), "--set", "data.group_field=missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab baseline: error: ") and "train.jsonl:1: group field" in err
    assert "\n" not in err
    assert not (tmp_path / "out" / "baseline.json").exists()


def test_sweep_report_starts_with_the_baseline(tmp_path):
    cfg = from_dict({**_cfg(tmp_path), "train": {"best_metric": "val_f1_1"}})
    row = baseline_row(cfg, "val_f1_1")
    assert row["value"] == 1.0 and row["name"].startswith("tfidf+")
    trial = Trial(0, {"train.lr": "1e-3"}, str(tmp_path / "t0"), "done", "val_f1_1",
                  best_value=0.5)
    lines = table(SweepResult(tmp_path, "val_f1_1", False, [trial], baseline=row)).splitlines()
    assert lines[2].startswith(f"| - | {row['name']} |  | 1.0000 |")
    assert lines[3].startswith("| 1 | 00 | 1e-3 | 0.5000 |")
    assert baseline_row(from_dict({"model": "m", "task": "sft", "data": {"train": "t"}}),
                        "val_loss") is None
