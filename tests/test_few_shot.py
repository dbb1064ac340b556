"""Few-shot classification: k-shot sampling (data.k_shot) and the in-context k-shot baseline
(peftlab.tasks.classification.in_context) on a tiny random Llama."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from peftlab.config import ConfigError, from_dict
from peftlab.data.classification import LabelledRow
from peftlab.data.readers import DataError
from peftlab.data.splits import sample_k_per_class
from peftlab.evaluation.metrics import classification_report
from peftlab.models import load_model
from peftlab.tasks import build_task
from peftlab.tasks.classification.in_context import (
    encode_in_context,
    in_context_baseline,
    in_context_classify,
    label_logprobs,
    order_demonstrations,
)

TEMPLATE = "Review: {text}\nAnswer:"
WORDS = {"pos": "the", "neg": "is"}  # single BPE tokens of the tiny tokenizer


def _rows(counts: dict[str, int]) -> list[dict]:
    return [{"text": f"{label} row {i}", "label": label}
            for label, n in counts.items() for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir: Path, train: Path, out: Path, data: dict | None = None,
         task: str = "classification") -> dict:
    cfg = {"model": str(model_dir), "task": task, "method": {"name": "lora", "r": 4},
           "data": {"train": str(train), **(data or {})},
           "train": {"precision": "fp32", "seed": 3}, "output_dir": str(out)}
    if task == "classification":
        cfg["classification"] = {"mode": "verbalizer", "verbalizer": WORDS,
                                 "prompt_template": TEMPLATE}
    return cfg


def _labelled(texts_labels: list[tuple[str, str]], source: str = "mem") -> list[LabelledRow]:
    return [LabelledRow(source, i + 1, t, None, label) for i, (t, label) in enumerate(texts_labels)]


# ----------------------------------------------------------------------------- sampling


def test_sample_k_per_class_counts_and_input_order():
    rows = _rows({"a": 10, "b": 7, "c": 5})
    random.Random(0).shuffle(rows)
    got = sample_k_per_class(rows, "label", 5, seed=1)
    assert Counter(r["label"] for r in got) == {"a": 5, "b": 5, "c": 5}
    positions = [rows.index(r) for r in got]
    assert positions == sorted(positions)  # a subset, in input order
    assert [r for r in rows if r["label"] == "c"] == [r for r in got if r["label"] == "c"]
    # labels compared as strings: 1 and "1" are one class
    mixed = [{"t": i, "y": 1 if i % 2 else "1"} for i in range(4)] + [{"t": 9, "y": 0}]
    assert len(sample_k_per_class(mixed, "y", 1, seed=0)) == 2


def test_sample_k_per_class_is_seeded_and_independent_of_row_order():
    rows = _rows({"pos": 40, "neg": 40})
    first = sample_k_per_class(rows, "label", 8, seed=42)
    shuffled = list(rows)
    random.Random(5).shuffle(shuffled)
    again = sample_k_per_class(shuffled, "label", 8, seed=42)

    def key(r: dict) -> str:
        return r["text"]

    assert sorted(map(key, again)) == sorted(map(key, first))
    assert sample_k_per_class(rows, "label", 8, seed=42) == first
    other = sample_k_per_class(rows, "label", 8, seed=43)
    assert sorted(map(key, other)) != sorted(map(key, first))
    # extra rows of another class leave this class's draw alone
    more = sample_k_per_class(rows + _rows({"mid": 9}), "label", 8, seed=42)
    assert [r for r in more if r["label"] != "mid"] == first
    # non-dict rows: a label function and a content key (not the row number)
    labelled = _labelled([(r["text"], r["label"]) for r in rows])
    relabelled = _labelled([(r["text"], r["label"]) for r in shuffled], source="other")
    pick = [sample_k_per_class(x, lambda r: r.label, 8, 42, content_key=lambda r: r.text)
            for x in (labelled, relabelled)]
    assert sorted(r.text for r in pick[0]) == sorted(r.text for r in pick[1])


def test_sample_k_per_class_errors_name_the_class():
    rows = _rows({"a": 5, "b": 2})
    with pytest.raises(ValueError, match=r"class 'b' has 2 row\(s\), fewer than k=3"):
        sample_k_per_class(rows, "label", 3, seed=0)
    with pytest.raises(ValueError, match="class 'z' has 0 row"):
        sample_k_per_class(rows, "label", 2, seed=0, classes=["a", "b", "z"])
    with pytest.raises(ValueError, match="k must be >= 1"):
        sample_k_per_class(rows, "label", 0, seed=0)
    with pytest.raises(ValueError, match="row 2: the label is missing"):
        sample_k_per_class([{"label": "a"}, {"label": None}], "label", 1, seed=0)


# ----------------------------------------------------------------------------- data.k_shot


def test_k_shot_config_errors(tmp_path):
    train = tmp_path / "t.jsonl"
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=r"data\.k_shot must be >= 1"):
            from_dict(_cfg(tmp_path, train, tmp_path / "o", {"k_shot": bad}))
    for bad in ("eight", 2.5, True):
        with pytest.raises(ConfigError, match=r"data\.k_shot: expected an integer"):
            from_dict(_cfg(tmp_path, train, tmp_path / "o", {"k_shot": bad}))
    with pytest.raises(ConfigError, match=r"data\.k_shot only applies to task: classification"):
        from_dict(_cfg(tmp_path, train, tmp_path / "o", {"k_shot": 8}, task="sft"))
    assert from_dict(_cfg(tmp_path, train, tmp_path / "o", {"k_shot": 8.0})).data.k_shot == 8


def test_k_shot_in_the_task_builder(tiny_chat_model_dir, tmp_path):
    rows = [{"text": f"who is the designer {'x' * (i % 5)} {i}", "label": ["pos", "neg"][i % 3 > 0]}
            for i in range(60)]  # 20 pos, 40 neg
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    _, tok = load_model(str(tiny_chat_model_dir))
    data = {"k_shot": 4, "validation_split": 0.25}
    prepared = build_task(from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o", data)), tok)
    full = build_task(from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                                     {"validation_split": 0.25})), tok)
    assert len(prepared.train) == 8
    assert prepared.report["train"]["class_counts"] == {"neg": 4, "pos": 4}
    assert prepared.report["k_shot"] == {"k": 4, "seed": 3, "rows_before": 45, "rows_kept": 8,
                                         "available_per_class": {"neg": 30, "pos": 15}}
    # k-shot rows come from the training side of the split; validation is unchanged
    assert [e["row"] for e in prepared.validation] == [e["row"] for e in full.validation]
    train_rows = {e["row"] for e in full.train}
    assert {e["row"] for e in prepared.train} <= train_rows
    with pytest.raises(DataError, match=r"data\.k_shot=16: .*class 'pos' has 15 row"):
        build_task(from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                                  {"k_shot": 16, "validation_split": 0.25})), tok)
    fixed = {"k_shot": 2, "labels": ["neg", "pos", "meh"]}
    with pytest.raises(DataError, match=r"data\.k_shot=2: .*class 'meh' has 0 row"):
        build_task(from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o", fixed)), tok)


# ----------------------------------------------------------------------------- in-context


@pytest.fixture(scope="module")
def tiny(tiny_chat_model_dir):
    model, tok = load_model(str(tiny_chat_model_dir))
    model.eval()
    return model, tok


def _meta(tok) -> dict:
    from peftlab.tasks.classification.task import label_token_ids

    labels = ["neg", "pos"]
    words = [WORDS[label] for label in labels]
    return {"labels": labels, "mode": "verbalizer", "prompt_template": TEMPLATE,
            "verbalizer": dict(zip(labels, words, strict=True)), "max_length": 64,
            "label_token_ids": label_token_ids(tok, TEMPLATE, words, labels)}


DEMOS = _labelled([("the designer is good", "pos"), ("who is it", "neg"),
                   ("the user said the assistant is great", "pos"), ("the system is bad", "neg"),
                   ("a designer", "pos"), ("who said that the designer is bad", "neg")])
ROWS = _labelled([("the designer", "pos"), ("who is the user and who is the assistant", "neg"),
                  ("is it", "pos"), ("the system said the designer is the designer", "neg"),
                  ("who", "neg")])


def test_order_demonstrations_interleaves_and_is_seeded():
    demos = _labelled([(f"p{i}", "pos") for i in range(6)] + [(f"n{i}", "neg") for i in range(6)])
    ordered = order_demonstrations(demos, seed=0)
    assert sorted(d.text for d in ordered) == sorted(d.text for d in demos)
    labels = [d.label for d in ordered]
    for i in range(0, 12, 2):  # one of each class per round
        assert sorted(labels[i:i + 2]) == ["neg", "pos"]
    assert [d.text for d in order_demonstrations(demos[::-1], seed=0)] == [d.text for d in ordered]
    others = {tuple(d.text for d in order_demonstrations(demos, seed=s)) for s in range(1, 6)}
    assert len(others | {tuple(d.text for d in ordered)}) > 1


def test_cached_prefix_matches_the_full_prompt_without_cache(tiny):
    model, tok = tiny
    meta = _meta(tok)
    inputs = encode_in_context(tok, meta, DEMOS, ROWS, seed=1)
    lengths = {len(q) for q in inputs.query_ids}
    assert len(lengths) >= 3  # rows of different lengths share batches: right padding is used
    # The split point is a word boundary: prefix + row are the tokens of the whole text.
    first = inputs.demonstrations[0]
    text = tok.decode(inputs.prefix_ids + inputs.query_ids[0])
    assert text.startswith(f"Review: {first.text}\nAnswer: {WORDS[first.label]}\n\nReview: ")
    assert text.endswith(f"\n\nReview: {ROWS[0].text}\nAnswer:")
    assert inputs.prefix_ids + inputs.query_ids[0] == tok(text)["input_ids"]

    got = label_logprobs(model, inputs.prefix_ids, inputs.query_ids, meta["label_token_ids"],
                         batch_size=3, pad_id=tok.pad_token_id)
    with torch.no_grad():
        want = torch.stack([
            model(input_ids=torch.tensor([inputs.prefix_ids + q]), use_cache=False)
            .logits[0, -1].float().log_softmax(-1)[meta["label_token_ids"]]
            for q in inputs.query_ids])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:, 0], got[:, 1])  # the two labels really differ

    report = in_context_classify(model, tok, meta, DEMOS, ROWS, seed=1, batch_size=2)
    torch.testing.assert_close(torch.tensor(report["label_logprobs"]), want, rtol=1e-5, atol=1e-5)
    pred = want.argmax(-1)
    expected = classification_report([1, 0, 1, 0, 0], pred, ["neg", "pos"])
    assert report["accuracy"] == expected["accuracy"]
    assert report["macro_f1"] == expected["macro_f1"]
    assert report["predictions"] == [["neg", "pos"][int(p)] for p in pred]
    assert report["k"] == 3 and report["demonstrations"] == 6
    assert report["prefix_tokens"] == len(inputs.prefix_ids)


def test_zero_shot_is_the_verbalizer_task(tiny_chat_model_dir, tiny, tmp_path):
    """k=0: the inputs are the trained task's, and the scores differ from its logits by a
    per-row constant (log-softmax normaliser), so the predictions are identical."""
    model, tok = tiny
    rows = [{"text": r.text, "label": r.label} for r in ROWS] * 2
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    val = _write_jsonl(tmp_path / "val.jsonl", rows[:5])
    cfg = from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o", {"validation": str(val)}))
    prepared = build_task(cfg, tok)
    meta = prepared.task.meta
    inputs = encode_in_context(tok, meta, [], ROWS)
    assert inputs.prefix_ids == []
    assert inputs.query_ids == [e["input_ids"] for e in prepared.validation]

    report = in_context_baseline(cfg, model, tok, k=0, batch_size=2)
    scores = torch.tensor(report["label_logprobs"])
    with torch.no_grad():
        logits = prepared.task.logits(model, prepared.task.collate(prepared.validation))
    shift = scores - logits
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=1e-5, atol=1e-5)
    assert report["k"] == 0 and report["prefix_tokens"] == 0
    assert report["accuracy"] == classification_report(
        [e["label"] for e in prepared.validation], logits.argmax(-1), meta["labels"])["accuracy"]

    # k > 0 draws the same k rows that data.k_shot trains on
    k2 = in_context_baseline(cfg, model, tok, k=2)
    shot_cfg = from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                              {"validation": str(val), "k_shot": 2}))
    shot_texts = sorted(tok.decode(e["input_ids"]) for e in build_task(shot_cfg, tok).train)
    demo_texts = sorted(f"Review: {r.text}\nAnswer:" for r in _demos_of(k2, tok))
    assert k2["k"] == 2 and k2["demonstrations"] == 4 and demo_texts == shot_texts


def _demos_of(report: dict, tok) -> list[LabelledRow]:
    """Parse the demonstrations back out of a report's prompt (texts only)."""
    text = report["prompt_prefix"]
    out = []
    for block in text.split("\n\n"):
        body = block.removeprefix("Review: ")
        review, answer = body.rsplit("\nAnswer: ", 1)
        out.append(LabelledRow("prompt", 0, review, None, answer))
    return out


def test_context_length_error_names_k_and_tokens(tiny):
    model, tok = tiny
    long = " ".join(["who is the designer"] * 12)
    demos = _labelled([(long, "pos"), (long, "neg")] * 4)
    with pytest.raises(ValueError, match=r"in-context k=4 \(8 demonstrations\): the prompt needs "
                                         r"\d+ tokens .* context is 256 tokens"):
        in_context_classify(model, tok, _meta(tok), demos, ROWS)
