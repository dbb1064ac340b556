"""Data cleaning (normalisation, exact/near duplicates, length filters, leakage) and the
grouped / stratified splits; checked against brute force and hand-made rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from peftlab.config import CleanConfig, from_dict
from peftlab.data.clean import (
    MinHasher,
    NearDuplicateIndex,
    clean_rows,
    dedup_key,
    jaccard,
    lsh_bands,
    normalize_record,
    normalize_text,
    remove_leakage,
    summary,
    word_shingles,
)
from peftlab.data.splits import grouped_split, split_off, stratified_split
from peftlab.tasks.sft.data import prepare_sft_data


def _text(row):
    return row["instruction"], row["output"]


def _words(rng: random.Random, n: int) -> str:
    vocab = [f"w{i}" for i in range(400)]
    return " ".join(rng.choice(vocab) for _ in range(n))


# ----------------------------------------------------------------------------- normalisation


def test_normalize_text_nfkc_and_whitespace():
    raw = "\ufeff  ﬁne Ｔｅｘｔ\u00a0here  \r\n\r\n\r\n\r\n    indented\u200b line   \n\n"
    assert normalize_text(raw) == "fine Text here\n\n    indented line"
    assert normalize_text("a  b") == "a  b"  # runs of spaces inside a line are kept (code)


def test_normalize_record_walks_nested_values():
    row = {"messages": [{"role": "user", "content": "Ｈi  "}], "n": 3, "x": None}
    assert normalize_record(row) == {"messages": [{"role": "user", "content": "Hi"}], "n": 3,
                                     "x": None}


# ----------------------------------------------------------------------------- exact / near


def test_exact_duplicates_ignore_case_and_whitespace():
    rows = [{"instruction": "Say hi", "output": "Hi!"},
            {"instruction": "say  HI", "output": "hi!"},
            {"instruction": "Say hi", "output": "Hello!"},
            {"instruction": "Say hi", "output": "Hi!"}]
    kept, keep, report = clean_rows(rows, CleanConfig(dedup=True), _text,
                                    row_numbers=[10, 11, 12, 13])
    assert keep == [0, 2]
    assert kept == [rows[0], rows[2]]
    assert report["exact_duplicates"] == 2 and report["rows_out"] == 2
    assert report["removed"]["exact_duplicates"] == [[11, 10], [13, 10]]
    assert dedup_key("A b") == dedup_key(" a   B ")


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    base = _words(rng, 300).split()
    other = base[:200] + _words(rng, 100).split()
    a, b = word_shingles(" ".join(base), 3), word_shingles(" ".join(other), 3)
    hasher = MinHasher(num_perm=512, seed=1)
    estimate = float((hasher.signature(a) == hasher.signature(b)).mean())
    assert abs(estimate - jaccard(a, b)) < 0.06, (estimate, jaccard(a, b))
    assert (hasher.signature(a) == MinHasher(512, seed=1).signature(a)).all()  # seeded


def test_lsh_bands_reach_recall_at_threshold():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= 0.99
        # one more row per band would miss the recall target: the banding is the most selective
        assert 1 - (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) < 0.99


def test_near_dedup_matches_brute_force():
    rng = random.Random(3)
    rows = []
    for _ in range(30):
        text = _words(rng, 60)
        rows.append({"instruction": text, "output": "ok"})
        if rng.random() < 0.5:  # a near copy: one word changed (Jaccard ~0.9)
            words = text.split()
            words[rng.randrange(len(words))] = "changed"
            rows.append({"instruction": " ".join(words), "output": "ok"})
    rng.shuffle(rows)
    cfg = CleanConfig(near_dedup=True, near_threshold=0.8)
    _, keep, report = clean_rows(rows, cfg, _text, seed=5)

    expected, sets = [], []
    for i, row in enumerate(rows):  # greedy first-occurrence, exact Jaccard against all kept
        s = word_shingles(row["instruction"] + "\n" + row["output"], 3)
        if all(jaccard(s, t) < 0.8 for t in sets):
            expected.append(i)
            sets.append(s)
    assert keep == expected
    assert report["near_duplicates"] == len(rows) - len(expected) > 5
    # a threshold above the copies' similarity keeps them
    _, keep_strict, _ = clean_rows(rows, CleanConfig(near_dedup=True, near_threshold=0.99),
                                   _text, seed=5)
    assert keep_strict == list(range(len(rows)))


def test_near_index_is_deterministic_in_seed():
    index = NearDuplicateIndex(0.8, seed=7)
    other = NearDuplicateIndex(0.8, seed=7)
    assert index.bands == other.bands
    assert index._band_keys({"a b c"}) == other._band_keys({"a b c"})


def test_length_filters_and_unreadable_rows_pass_through():
    rows = [{"instruction": "q", "output": "   "}, {"instruction": "q", "output": "one"},
            {"instruction": "q", "output": "one two three"},
            {"instruction": "q " * 10, "output": "one two"}, {"bad": 1}]

    def text_of(row):
        return None if "bad" in row else _text(row)

    cfg = CleanConfig(min_tokens=2, max_tokens=8)
    kept, keep, report = clean_rows(rows, cfg, text_of, count_tokens=lambda s: len(s.split()))
    assert keep == [2, 4]
    assert (report["empty"], report["too_short"], report["too_long"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="count_tokens"):
        clean_rows(rows, cfg, text_of)


def test_leakage_removes_train_rows_duplicating_validation():
    rng = random.Random(1)
    shared = _words(rng, 40)
    near = shared.split()
    near[5] = "different"
    val = [{"instruction": shared, "output": "a"}, {"instruction": _words(rng, 40), "output": "b"}]
    train = [{"instruction": _words(rng, 40), "output": "c"},
             {"instruction": shared.upper(), "output": "A"},  # exact after normalising case
             {"instruction": " ".join(near), "output": "a"},
             {"instruction": _words(rng, 40), "output": "d"}]
    kept, keep, report = remove_leakage(train, val, CleanConfig(leakage=True), _text, seed=0,
                                        train_row_numbers=[2, 3, 4, 5])
    assert keep == [0, 3]
    assert (report["exact"], report["near"], report["removed_from_train"]) == (1, 1, 2)
    assert report["removed"] == {"exact": [[3, 1]], "near": [[4, 1]]}
    assert "removed 2 training rows" in summary({"leakage": report})


# ----------------------------------------------------------------------------- splits


def test_grouped_split_keeps_groups_together():
    rows = [{"doc": f"d{i % 7}", "i": i} for i in range(70)] + [{"doc": "big", "i": -1}] * 20
    train, val = grouped_split(rows, "doc", 0.2, seed=3)
    assert {r["doc"] for r in train}.isdisjoint({r["doc"] for r in val})
    assert len(train) + len(val) == len(rows)
    assert abs(len(val) - 0.2 * len(rows)) <= 10
    assert grouped_split(rows, "doc", 0.2, seed=3) == (train, val)
    assert grouped_split(rows, "doc", 0.2, seed=4) != (train, val)
    with pytest.raises(ValueError, match="row 2: group field 'doc' is missing"):
        grouped_split([{"doc": 1}, {"x": 1}], "doc", 0.5, seed=0)


def test_grouped_split_with_only_large_groups_holds_out_the_smallest():
    rows = [{"doc": "a"}] * 10 + [{"doc": "b"}] * 6 + [{"doc": "c"}] * 8
    train, val = grouped_split(rows, "doc", 0.05, seed=0)
    assert [r["doc"] for r in val] == ["b"] * 6


def test_stratified_split_keeps_class_shares():
    rows = [{"label": "pos" if i % 4 else "neg", "i": i} for i in range(100)]
    train, val = stratified_split(rows, "label", 0.2, seed=0)
    assert len(val) == 20
    assert sum(r["label"] == "neg" for r in val) == 5  # 25% of 20
    assert stratified_split(rows, "label", 0.2, seed=0) == (train, val)
    with pytest.raises(ValueError, match="row 1: label field 'y'"):
        stratified_split(rows, "y", 0.2, seed=0)


def test_split_off_still_works():
    train, val = split_off(list(range(10)), 0.3, seed=0)
    assert len(val) == 3 and sorted(train + val) == list(range(10))


# ----------------------------------------------------------------------------- in the run


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_sft_data_reports_cleaning(tmp_path, tiny_chat_model_dir, capsys):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    train = [{"instruction": "Name a colour", "output": "Red"},
             {"instruction": "name a  colour", "output": "red"},  # exact duplicate of row 1
             {"instruction": "Ｎame a fruit", "output": "Apple"},
             {"instruction": "Name a city", "output": "Paris"},  # also in validation
             {"instruction": "Name an animal", "output": ""}]
    val = [{"instruction": "Name a city", "output": "Paris"}]
    cfg = from_dict({
        "model": str(tiny_chat_model_dir),
        "data": {"train": str(_write(tmp_path / "t.jsonl", train)),
                 "validation": str(_write(tmp_path / "v.jsonl", val)), "on_error": "skip",
                 "clean": {"normalize": True, "dedup": True, "leakage": True, "min_tokens": 1}},
        "train": {"max_length": 64},
    })
    train_ex, val_ex, report = prepare_sft_data(cfg, tok)
    c = report["cleaning"]
    assert c["train"]["exact_duplicates"] == 1
    assert c["train"]["normalized_rows_changed"] == 1
    # the row without an answer can't be read: cleaning passes it on, the builder reports it
    assert c["train"]["empty"] == 0 and report["train"]["dropped_invalid"] == 1
    assert "t.jsonl:5" in report["train"]["errors"][0]
    assert c["train"]["removed"]["exact_duplicates"] == [[2, 1]]
    assert c["leakage"]["exact"] == 1 and c["leakage"]["removed"]["exact"] == [[4, 1]]
    assert len(train_ex) == 2 and len(val_ex) == 1
    assert "Name a fruit" in tok.decode(train_ex[1]["input_ids"])  # normalised text trained on
    json.dumps(report)  # goes to data_report.json
    assert "cleaning leakage" in capsys.readouterr().out


def test_cleaning_off_by_default(tmp_path, tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    rows = [{"instruction": "Say hi", "output": "Hi"}] * 3
    cfg = from_dict({"model": str(tiny_chat_model_dir),
                     "data": {"train": str(_write(tmp_path / "t.jsonl", rows))}})
    train_ex, _, report = prepare_sft_data(cfg, tok)
    assert len(train_ex) == 3 and "cleaning" not in report
