"""Augmentation: EDA operations, embedding-neighbour synonyms, seeded paraphrasing with the
model, and that only training rows are ever augmented."""

from __future__ import annotations

import functools
import json
import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.config import AugmentConfig, from_dict
from peftlab.data.augment import (
    SYNONYMS,
    augment_rows,
    eda,
    embedding_synonyms,
    paraphrase,
    random_deletion,
    random_insertion,
    random_swap,
    synonym_replacement,
    whole_word_tokens,
)
from peftlab.evaluation.generate import generate_replies
from peftlab.tasks.sft.data import prepare_sft_data

TEXT = "The good movie was very long but the story was simple and funny"


def test_synonym_list():
    assert len(SYNONYMS) >= 150
    for word, syns in SYNONYMS.items():
        assert word == word.lower() and syns and word not in syns


def test_eda_is_seeded():
    a = [eda(TEXT, random.Random(1), 0.2) for _ in range(3)]
    b = [eda(TEXT, random.Random(1), 0.2) for _ in range(3)]
    assert a == b
    assert {eda(TEXT, random.Random(s), 0.2) for s in range(10)} != {TEXT}


def test_synonym_replacement_keeps_case_and_punctuation():
    words = "Good, good film.".split()
    out = synonym_replacement(words, 5, random.Random(0), {"good": ["fine"], "film": ["movie"]})
    assert out == ["Fine,", "fine", "movie."]


def test_random_swap_and_deletion():
    words = TEXT.split()
    swapped = random_swap(words, 3, random.Random(0))
    assert Counter(swapped) == Counter(words) and swapped != words
    deleted = random_deletion(words, 0.3, random.Random(0))
    assert 0 < len(deleted) < len(words)
    assert all(w in words for w in deleted)
    assert len(random_deletion(["one", "two"], 1.0, random.Random(0))) == 1  # never empty


def test_random_insertion_adds_synonyms():
    words = TEXT.split()
    out = random_insertion(words, 2, random.Random(0), SYNONYMS)
    assert len(out) == len(words) + 2
    added = Counter(out) - Counter(words)
    pool = {s for w in words if w.lower() in SYNONYMS for s in SYNONYMS[w.lower()]}
    assert set(added) <= pool


def _alpaca(n: int) -> list[dict]:
    return [{"instruction": f"Explain why the good movie {i} was very long", "input": "",
             "output": f"Answer {i} is good"} for i in range(n)]


def test_augment_rows_changes_only_prompt_fields():
    rows = _alpaca(6)
    cfg = AugmentConfig(method="eda", copies=2, alpha=0.2)
    new, sources, report = augment_rows(rows, cfg, seed=0, fields=["instruction", "input"])
    assert report["rows_added"] == len(new) == len(sources)
    assert report["rows_added"] + report["unchanged"] == 12
    for row, i in zip(new, sources, strict=True):
        assert row["output"] == rows[i]["output"] and row["input"] == ""
        assert row["instruction"] != rows[i]["instruction"]
    assert rows == _alpaca(6)  # the input rows are not modified
    again = augment_rows(rows, cfg, seed=0, fields=["instruction", "input"])
    assert again[0] == new
    assert augment_rows(rows, cfg, seed=1, fields=["instruction", "input"])[0] != new


def test_augment_rows_changes_user_turns_only():
    conv = [{"role": "system", "content": "Be very good"},
            {"role": "user", "content": "Tell me a funny and simple story"},
            {"role": "assistant", "content": "A good story"}]
    rows = [{"messages": conv}, {"messages": json.dumps(conv)}]  # a list, and a CSV-style string
    cfg = AugmentConfig(method="eda", alpha=0.5)
    new, _, _ = augment_rows(rows, cfg, seed=3, fields=["messages"])
    for row in new:
        msgs = row["messages"]
        assert msgs[0] == conv[0] and msgs[2] == conv[2]
        assert msgs[1]["content"] != conv[1]["content"]


@pytest.fixture(scope="module")
def tiny(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    return model, tok


def test_embedding_synonyms_are_cosine_neighbours(tiny):
    model, tok = tiny
    model = AutoModelForCausalLM.from_config(model.config)  # a copy we may edit
    vocab = whole_word_tokens(tok)
    assert vocab and all(len(w) >= 3 and w.isalpha() for w in vocab)
    a, b = sorted(vocab)[:2]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[vocab[b]] = 3.0 * emb[vocab[a]]  # same direction: cosine 1
    syn = embedding_synonyms(model, tok, [a, "notaword"], k=2, min_similarity=0.0)
    assert list(syn) == [a]
    assert syn[a][0] == b and len(syn[a]) == 2 and a not in syn[a]


def test_eda_with_embedding_synonyms(tiny):
    model, tok = tiny
    word = sorted(whole_word_tokens(tok))[0]
    rows = [{"instruction": f"{word} {word} {word}", "output": "x"}]
    cfg = AugmentConfig(method="eda", synonyms="embedding", copies=4, alpha=0.5)
    new, _, report = augment_rows(rows, cfg, seed=0, fields=["instruction"], model=model,
                                  tokenizer=tok)
    assert report["synonym_words"] == 1 and new
    with pytest.raises(ValueError, match="needs the model"):
        augment_rows(rows, cfg, seed=0, fields=["instruction"])


def test_paraphrase_is_seeded(tiny):
    model, tok = tiny
    reply = functools.partial(generate_replies, model, tok, max_new_tokens=8, do_sample=True,
                              temperature=0.9, top_p=0.95)
    texts = ["Name a colour", "Say hello to the user"]
    state = torch.random.get_rng_state()
    a = paraphrase(texts, reply, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    assert a == paraphrase(texts, reply, seed=0)
    assert a != paraphrase(texts, reply, seed=1)
    rows = [{"instruction": t, "output": "ok"} for t in texts]
    cfg = AugmentConfig(method="paraphrase", copies=2, max_new_tokens=8)
    new, sources, report = augment_rows(rows, cfg, seed=0, fields=["instruction"], reply=reply)
    assert report["rows_added"] + report["unchanged"] == 4
    assert all(r["output"] == "ok" for r in new)
    assert [rows[i]["instruction"] for i in sources] != [r["instruction"] for r in new]


def test_prepare_sft_data_augments_train_only(tmp_path, tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _alpaca(10)))
    base = {"model": str(tiny_chat_model_dir),
            "data": {"train": str(path), "validation_split": 0.3}, "train": {"seed": 1}}
    plain_train, plain_val, _ = prepare_sft_data(from_dict(base), tok)
    base["data"]["augment"] = {"method": "eda", "copies": 2, "alpha": 0.3}
    train, val, report = prepare_sft_data(from_dict(base), tok)
    assert val == plain_val  # validation rows are never augmented
    assert train[:len(plain_train)] == plain_train
    assert len(train) == len(plain_train) + report["augmentation"]["rows_added"]
    assert report["augmentation"]["rows_in"] == 7 and report["augmentation"]["rows_added"] > 0
