"""Tests for the invented-catalogue demo data set."""

from __future__ import annotations

import json

import pytest

from peftlab.lab.demo_data import (
    ATTRIBUTES,
    CATALOGUE,
    demo_facts,
    generate_demo_data,
    keyword_accuracy,
    keyword_match,
    write_demo_data,
)

ROW_KEYS = {"instruction", "input", "output"}


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return generate_demo_data(seed=0)


def test_deterministic_per_seed(data):
    assert generate_demo_data(seed=0) == data
    assert generate_demo_data(seed=1) != data


def test_split_sizes(data):
    assert 300 <= len(data["train"]) <= 400
    assert 0.05 * len(data["train"]) <= len(data["validation"]) <= 0.15 * len(data["train"])
    assert 40 <= len(data["heldout"]) <= 60


def test_row_fields(data):
    for split in ("train", "validation"):
        for row in data[split]:
            assert set(row) == ROW_KEYS
            assert row["input"] == ""
            assert row["instruction"] and row["output"]
    for row in data["heldout"]:
        assert set(row) == ROW_KEYS | {"keywords"}
        assert row["keywords"] and all(isinstance(k, str) and k for k in row["keywords"])


def test_each_fact_has_three_train_phrasings(data):
    for fact in demo_facts():
        questions = {r["instruction"] for r in data["train"] if r["output"] == fact.answer}
        assert len(questions) == 3


def test_heldout_questions_are_unseen(data):
    seen = {r["instruction"] for r in data["train"] + data["validation"]}
    for row in data["heldout"]:
        assert row["instruction"] not in seen
    train_templates = {t for a in ATTRIBUTES for t in a.train}
    heldout_templates = {t for a in ATTRIBUTES for t in a.heldout}
    assert not train_templates & heldout_templates


def test_validation_rows_not_in_train(data):
    train_rows = {json.dumps(r, sort_keys=True) for r in data["train"]}
    for row in data["validation"]:
        assert json.dumps(row, sort_keys=True) not in train_rows


def test_heldout_keywords_are_learnable(data):
    train_answers = [r["output"] for r in data["train"]]
    for row in data["heldout"]:
        assert keyword_match(row["output"], row["keywords"])
        assert any(keyword_match(a, row["keywords"]) for a in train_answers)


def test_keyword_never_in_its_question(data):
    for row in data["heldout"]:
        assert not keyword_match(row["instruction"], row["keywords"])
    for fact in demo_facts():
        for template in fact.attribute.train + fact.attribute.heldout:
            assert not keyword_match(fact.ask(template), [fact.keyword])


def test_keywords_unique_and_unambiguous():
    facts = demo_facts()
    keywords = [f.keyword for f in facts]
    assert len(set(keywords)) == len(keywords)
    names = " ".join(p.name for p in CATALOGUE)
    for fact in facts:
        assert not keyword_match(names, [fact.keyword])
        # A keyword must identify its own fact: no other fact's answer may contain it.
        matching = [f for f in facts if keyword_match(f.answer, [fact.keyword])]
        assert matching == [fact]


def test_heldout_balanced_over_attributes(data):
    answer_to_attr = {f.answer: f.attribute.key for f in demo_facts()}
    counts: dict[str, int] = {}
    for row in data["heldout"]:
        key = answer_to_attr[row["output"]]
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {a.key for a in ATTRIBUTES}
    assert len(set(counts.values())) == 1


@pytest.mark.parametrize(
    ("answer", "keywords", "expected"),
    [
        ("It was designed by VOSSBERG.", ["Vossberg"], True),
        ("It was designed by  Ilse\n Vossberg.", ["Ilse Vossberg"], True),
        ("Designed by Quellan.", ["Vossberg"], False),
        ("It costs $184.", ["$184"], True),
        ("It costs 184 dollars.", ["$184"], True),
        ("It costs $184.00.", ["$184"], True),
        ("It costs $1840.", ["$184"], False),
        ("It costs $1,840.", ["$184"], False),
        ("It costs $184.50.", ["$184"], False),
        ("Model 11842 costs $90.", ["$184"], False),
        ("Model 2.184 costs $90.", ["$184"], False),
        ("It costs $1,840.", ["$1,840"], True),
        ("It costs $1840.", ["$1,840"], True),
        ("Vossberg, made in Harrowmouth.", ["Vossberg", "Harrowmouth"], True),
        ("Vossberg, made elsewhere.", ["Vossberg", "Harrowmouth"], False),
    ],
)
def test_keyword_match(answer, keywords, expected):
    assert keyword_match(answer, keywords) is expected


@pytest.mark.parametrize("keywords", [[], [""], ["  "]])
def test_keyword_match_rejects_empty_keywords(keywords):
    with pytest.raises(ValueError):
        keyword_match("anything", keywords)


def test_keyword_accuracy(data):
    rows = data["heldout"]
    assert keyword_accuracy([r["output"] for r in rows], rows) == 1.0
    assert keyword_accuracy(["I do not know."] * len(rows), rows) == 0.0
    half = [r["output"] if i % 2 == 0 else "no idea" for i, r in enumerate(rows)]
    assert keyword_accuracy(half, rows) == pytest.approx(len(rows[::2]) / len(rows))
    with pytest.raises(ValueError):
        keyword_accuracy(["x"], rows)


def test_write_demo_data_round_trip(tmp_path, data):
    paths = write_demo_data(tmp_path / "demo", seed=0)
    assert set(paths) == {"train", "validation", "heldout"}
    for name, path in paths.items():
        assert path.name == f"{name}.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == data[name]
