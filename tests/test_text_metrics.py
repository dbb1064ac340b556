"""Text-generation metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.data.sft import tokenize_conversation
from peftlab.evaluation.text_metrics import (
    corpus_bleu,
    exact_match,
    generation_report,
    normalize_answer,
    rouge,
    split_prompt_reference,
    text_metrics,
)


def test_rouge_by_hand():
    r = rouge(["the cat sat"], ["the cat ran"])
    assert r["rouge1"] == pytest.approx(2 / 3)  # P = R = 2/3
    assert r["rouge2"] == pytest.approx(1 / 2)  # bigrams: "the cat" of 2
    assert r["rougeL"] == pytest.approx(2 / 3)  # LCS "the cat"
    r = rouge(["the cat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(2 * 1 * (2 / 6) / (1 + 2 / 6))  # P 1, R 1/3
    assert r["rouge2"] == pytest.approx(2 * 1 * (1 / 5) / (1 + 1 / 5))  # P 1, R 1/5
    both = rouge(["the cat sat", "the cat"], ["the cat ran", "the cat sat on the mat"])
    assert both["rouge1"] == pytest.approx((2 / 3 + 0.5) / 2)  # mean over examples


def test_rouge_uses_stemming():
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)
    assert rouge(["cats running"], ["cat runs"], use_stemmer=False)["rouge1"] == 0.0


def test_exact_match_normalisation():
    assert normalize_answer("  The  Cat, sat! ") == "cat sat"
    assert exact_match(["The Cat!", "a dog", "dogs"], ["cat", "dog.", "dog"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_bleu_by_hand():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == 1.0
    # hyp a b c d e vs ref a b c d f g: n-gram precisions 4/5, 3/4, 2/3, 1/2; BP exp(1 - 6/5)
    out = corpus_bleu(["a b c d e"], ["a b c d f g"])
    assert out["precisions"] == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2])
    assert out["brevity_penalty"] == pytest.approx(math.exp(-0.2))
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * math.exp(-0.2)
    assert out["bleu"] == pytest.approx(expected)
    # clipping: "the" counts at most as often as in the reference
    clipped = corpus_bleu(["the the the the"], ["the cat is here"])
    assert clipped["precisions"][0] == pytest.approx(1 / 4) and clipped["bleu"] == 0.0
    # corpus level: counts are summed before dividing; longer hypothesis: no penalty
    two = corpus_bleu(["a b c d e x", "a b c d"], ["a b c d e", "a b c d"])
    assert two["precisions"][0] == pytest.approx(9 / 10) and two["brevity_penalty"] == 1.0
    # several references: the closest length is the reference length
    multi = corpus_bleu(["a b c d"], [["a b c d e f g h", "a b c d e"]])
    assert multi["ref_length"] == 5


def test_text_metrics_keys():
    m = text_metrics(["Paris."], ["paris"])
    assert m == {"rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0, "exact_match": 1.0, "bleu": 0.0}


def test_generation_report_on_tiny_model(diverse_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(diverse_chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(diverse_chat_model_dir)
    convs = [[{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]
             for w in ("hello", "the answer", "ok")]
    examples = [tokenize_conversation(c, tok) for c in convs]
    prompt, ref = split_prompt_reference(examples[1])
    assert tok.decode(ref).startswith("the answer<|im_end|>")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    report = generation_report(model, tok, examples, max_new_tokens=6, batch_size=2)
    assert report["examples"] == 3
    assert [s["reference"] for s in report["samples"]] == ["hello", "the answer", "ok"]
    assert all(0.0 <= report[k] <= 1.0 for k in ("rouge1", "rougeL", "exact_match", "bleu"))
    preds = [s["prediction"] for s in report["samples"]]
    assert all(preds) and len(set(preds)) == 3  # real, different replies are scored
    recomputed = text_metrics(preds, [s["reference"] for s in report["samples"]])
    assert {k: report[k] for k in recomputed} == recomputed
    again = generation_report(model, tok, examples, max_new_tokens=6, batch_size=3)
    assert again["samples"] == report["samples"]  # greedy, independent of batching

    # Scores that are not all 0: references that are the model's own answer (example 0) or
    # share a word with it (example 1); each score must belong to its own example's answer.
    first_word = preds[1].split()[0]
    refs = [preds[0], f"{first_word} zebra", "nothing alike"]
    convs = [[c[0], {"role": "assistant", "content": r}] for c, r in zip(convs, refs, strict=True)]
    scored = generation_report(model, tok, [tokenize_conversation(c, tok) for c in convs],
                               max_new_tokens=6, batch_size=2)
    assert [s["prediction"] for s in scored["samples"]] == preds
    assert [s["reference"] for s in scored["samples"]] == refs
    assert scored["exact_match"] == pytest.approx(1 / 3) and 0 < scored["rouge1"] < 1
    assert {k: scored[k] for k in recomputed} == text_metrics(preds, refs)
