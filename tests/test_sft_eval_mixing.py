"""Issue 4: forgetting + generation evaluation of SFT runs, replay and multi-task mixtures.

Tiny random Llama (conftest), data written to tmp as JSONL / text. Checks compare real
values: the "before" perplexity and base predictions against an independent measurement on
a freshly loaded base model, per-source losses against the overall val_loss, replay and
mixture counts against hand-computed quotas.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftlab
from peftlab.config import ConfigError, from_dict
from peftlab.data.mixing import mixture_quotas, replay_count
from peftlab.evaluation.perplexity import forgetting_report
from peftlab.evaluation.sft_eval import METRICS, generation_examples
from peftlab.evaluation.text_metrics import generation_report
from peftlab.tasks.sft.data import prepare_sft_data

WORDS = ["lantern", "pack", "shell", "tent", "stove", "bag", "rope", "map", "boot", "hat"]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _alpaca_rows(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} item {i}: name the {WORDS[i % 10]}",
             "input": "", "output": f"the {WORDS[(i * 3) % 10]} {i}"} for i in range(n)]


def _chat_rows(n: int, tag: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} where is the {WORDS[i % 10]}?"},
                          {"role": "assistant", "content": f"near the {WORDS[(i + 1) % 10]}"}]}
            for i in range(n)]


def _corpus(tmp_path: Path) -> Path:
    text = "\n".join(f"The {WORDS[i % 10]} and the {WORDS[(i * 7) % 10]} went to the market "
                     f"number {i}." for i in range(60))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def _run_cfg(model_dir: Path, out: Path, data: dict, eval_: dict | None = None, **train) -> dict:
    return {"model": str(model_dir), "method": {"name": "lora", "r": 4, "alpha": 8},
            "data": data, "eval": eval_ or {},
            "train": {"epochs": 1, "batch_size": 4, "lr": 3e-3, "precision": "fp32",
                      "log_every": 1, **train},
            "output_dir": str(out)}


# ----------------------------------------------------------------------------- config


BASE = {"model": "tiny"}
MIX = [{"name": "a", "train": "a.jsonl", "weight": 1}, {"name": "b", "train": "b.jsonl"}]


@pytest.mark.parametrize("raw, needle", [
    ({"data": {"mixture": [{"name": "a"}]}}, "data.mixture[0].train is required"),
    ({"data": {"mixture": [MIX[0], {"name": "b", "train": "b", "wieght": 2}]}},
     "data.mixture[1]: unknown key 'wieght' (did you mean 'weight'?)"),
    ({"data": {"mixture": [{"name": "a", "train": "a", "weight": "heavy"}]}},
     "data.mixture[0].weight: expected a number"),
    ({"data": {"mixture": [{"name": "a", "train": "a", "weight": -1}]}},
     "data.mixture[0].weight must be >= 0"),
    ({"data": {"mixture": [MIX[0], {"name": "a", "train": "b"}]}},
     "data.mixture[1].name: 'a' is used twice"),
    ({"data": {"mixture": [{"name": "replay", "train": "a"}]}}, "data.mixture[0].name"),
    ({"data": {"mixture": [{"name": "a b", "train": "a"}]}}, "data.mixture[0].name"),
    ({"data": {"mixture": [{"name": "a", "train": "a", "format": "alpca"}]}},
     "data.mixture[0].format"),
    ({"data": {"mixture": [{"name": "a", "train": "a", "weight": 0}]}},
     "data.mixture: at least one source needs weight > 0"),
    ({"data": {"mixture": ["a.jsonl"]}}, "data.mixture[0]: expected a mapping"),
    ({"data": {"train": "x.jsonl", "mixture": MIX}}, "data.train: give the files per source"),
    ({"data": {"train": "x.jsonl", "mixture_size": 10}}, "data.mixture_size needs data.mixture"),
    ({"data": {"train": "x.jsonl", "replay_ratio": 0.2}}, "data.replay"),
    ({"data": {"train": "x.jsonl", "replay": "r.txt", "replay_ratio": 1.0}},
     "data.replay_ratio must be in [0, 1)"),
    ({"eval": {"compare_base": True}}, "eval.compare_base needs eval.generate"),
    ({"eval": {"forgetting_window": 64, "forgetting_stride": 65}}, "eval.forgetting_stride"),
    ({"eval": {"generate_max_rows": 0}}, "eval.generate_max_rows must be >= 1"),
    ({"eval": {"forgetting_corpus": 3}}, "eval.forgetting_corpus: expected a string"),
])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        from_dict({**BASE, **raw})
    assert needle in str(err.value)


def test_mixture_config_is_copied_and_weights_become_floats():
    entries = [dict(MIX[0]), dict(MIX[1])]
    cfg = from_dict({**BASE, "data": {"mixture": entries, "mixture_size": 7}})
    assert [e["weight"] for e in cfg.data.mixture] == [1.0, 1.0]
    assert "weight" not in entries[1]  # the caller's dicts are left alone
    assert cfg.to_dict()["data"]["mixture"][1] == {"name": "b", "train": "b.jsonl", "weight": 1.0}


def test_missing_forgetting_corpus_and_too_long_window_name_the_key(tiny_chat_model_dir,
                                                                     tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", _alpaca_rows(8, "t"))
    data = {"train": str(train), "validation_split": 0.25}
    cfg = _run_cfg(tiny_chat_model_dir, tmp_path / "a", data,
                   {"forgetting_corpus": str(tmp_path / "nope.txt")}, max_steps=1)
    with pytest.raises(ConfigError, match=r"eval\.forgetting_corpus: file not found"):
        peftlab.train(cfg, progress=False)
    assert not (tmp_path / "a" / "checkpoints").exists()  # failed before any work
    cfg = _run_cfg(tiny_chat_model_dir, tmp_path / "b", data,
                   {"forgetting_corpus": str(_corpus(tmp_path)), "forgetting_window": 512},
                   max_steps=1)
    with pytest.raises(ConfigError, match=r"eval\.forgetting_window: 512 .*context \(256"):
        peftlab.train(cfg, progress=False)
    cfg = _run_cfg(tiny_chat_model_dir, tmp_path / "c", {"train": str(train)},
                   {"generate": True}, max_steps=1)
    with pytest.raises(ConfigError, match=r"eval\.generate needs validation"):
        peftlab.train(cfg, progress=False)


# ----------------------------------------------------------------------------- arithmetic


def test_mixture_quotas_by_largest_remainder():
    assert mixture_quotas([2, 1, 1], 10) == [5, 3, 2]  # 5, 2.5, 2.5: the tie goes to the first
    assert mixture_quotas([1, 1, 1], 10) == [4, 3, 3]
    assert mixture_quotas([0.7, 0.2, 0.1], 9) == [6, 2, 1]  # 6.3, 1.8, 0.9
    assert mixture_quotas([1, 0], 5) == [5, 0]
    assert replay_count(30, 0.25) == 10 and replay_count(30, 0.0) == 0
    assert replay_count(90, 0.1) == 10


def test_generation_examples_round_robin_over_sources():
    exs = ([{"source": "a", "i": i} for i in range(5)]
           + [{"source": "b", "i": i} for i in range(2)])
    picked = generation_examples(exs, 5)
    assert [(e["source"], e["i"]) for e in picked] == [("a", 0), ("b", 0), ("a", 1), ("b", 1),
                                                       ("a", 2)]
    plain = [{"i": i} for i in range(4)]
    assert generation_examples(plain, 2) == plain[:2]
    assert generation_examples(plain, None) == plain


# ----------------------------------------------------------------------------- replay


def _prepare(model_dir: Path, data: dict, seed: int = 0, **train):
    cfg = from_dict({"model": str(model_dir), "data": data,
                     "train": {"seed": seed, "max_length": 128, **train}})
    tok = AutoTokenizer.from_pretrained(model_dir)
    return prepare_sft_data(cfg, tok), tok


def test_replay_ratio_counts_and_is_seeded(tiny_chat_model_dir, tmp_path):
    train = _write_jsonl(tmp_path / "task.jsonl", _alpaca_rows(30, "task"))
    lines = [f"general text line {i} about the {WORDS[i % 10]}" for i in range(50)]
    replay = tmp_path / "wiki.txt"
    replay.write_text("\n\n".join(lines))  # blank lines are skipped
    data = {"train": str(train), "replay": str(replay), "replay_ratio": 0.25}
    (ex, _, report), tok = _prepare(tiny_chat_model_dir, data)
    rep = [e for e in ex if e.get("source") == "replay"]
    assert len(ex) == 40 and len(rep) == 10  # 10 / (30 + 10) = 0.25
    texts = {tok.decode(e["input_ids"]) for e in rep}
    assert texts <= set(lines)
    for e in rep:  # plain text: LM loss on every token, no chat template
        assert e["labels"] == e["input_ids"]
    r = report["replay"]
    assert (r["sampled"], r["unique"], r["repeated"], r["plain_text"], r["rows"]) == (10, 10, 0,
                                                                                      10, 50)
    assert report["train"]["kept"] == 40 and report["train"]["replay_examples"] == 10
    (again, _, _), _ = _prepare(tiny_chat_model_dir, data)
    assert again == ex
    (other, _, _), _ = _prepare(tiny_chat_model_dir, data, seed=1)
    assert {tok.decode(e["input_ids"]) for e in other if e.get("source") == "replay"} != texts


def test_replay_instruction_rows_repeat_and_truncation(tiny_chat_model_dir, tmp_path):
    train = _write_jsonl(tmp_path / "task.jsonl", _alpaca_rows(24, "task"))
    long_text = " ".join(WORDS * 30)
    replay = _write_jsonl(tmp_path / "mix.jsonl", [
        {"text": long_text},
        {"instruction": "say hi", "output": "hi there"},
        {"messages": [{"role": "user", "content": "and?"},
                      {"role": "assistant", "content": "bye"}]},
    ])
    data = {"train": str(train), "replay": str(replay), "replay_ratio": 0.2}
    (ex, _, report), tok = _prepare(tiny_chat_model_dir, data)
    rep = [e for e in ex if e.get("source") == "replay"]
    assert len(rep) == 6  # 0.2 * 24 / 0.8; 3 distinct rows, each used twice
    r = report["replay"]
    assert (r["unique"], r["repeated"], r["plain_text"], r["instruction"], r["truncated"]) == (
        3, 3, 1, 2, 1)
    plain = [e for e in rep if e["labels"] == e["input_ids"]]
    assert len(plain) == 2 and all(len(e["input_ids"]) == 128 for e in plain)  # cut, not dropped
    chat = [e for e in rep if e["labels"] != e["input_ids"]]
    assert len(chat) == 4 and all(e["labels"][0] == -100 for e in chat)  # prompt is masked
    answers = {tok.decode([t for t in e["labels"] if t != -100]) for e in chat}
    assert answers == {"hi there<|im_end|>\n", "bye<|im_end|>\n"}  # as the chat template ends


def test_replay_row_without_text_or_instruction_names_the_row(tiny_chat_model_dir, tmp_path):
    train = _write_jsonl(tmp_path / "task.jsonl", _alpaca_rows(8, "task"))
    replay = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine text here"}, {"body": "x"}])
    data = {"train": str(train), "replay": str(replay), "replay_ratio": 0.5}
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        _prepare(tiny_chat_model_dir, data)


# ----------------------------------------------------------------------------- mixtures


def _mixture_files(tmp_path: Path) -> dict[str, Path]:
    return {"a": _write_jsonl(tmp_path / "a.jsonl", _alpaca_rows(40, "alpha")),
            "b": _write_jsonl(tmp_path / "b.jsonl", _chat_rows(20, "beta")),
            "a_val": _write_jsonl(tmp_path / "a_val.jsonl", _alpaca_rows(6, "alpha-val")),
            "b_val": _write_jsonl(tmp_path / "b_val.jsonl", _chat_rows(4, "beta-val"))}


def test_mixture_sampling_respects_weights_and_overrides(tiny_chat_model_dir, tmp_path):
    f = _mixture_files(tmp_path)
    mixture = [{"name": "a", "train": str(f["a"]), "validation": str(f["a_val"]), "weight": 3,
                "template": "alpaca"},
               {"name": "b", "train": str(f["b"]), "weight": 1, "system_prompt": "Be brief."}]
    data = {"mixture": mixture, "mixture_size": 40, "validation_split": 0.25}
    (train, val, report), tok = _prepare(tiny_chat_model_dir, data)
    assert Counter(e["source"] for e in train) == {"a": 30, "b": 10}
    # a: own validation file (6 rows); b: validation_split 0.25 of its 20 rows
    assert Counter(e["source"] for e in val) == {"a": 6, "b": 5}
    s = report["mixture"]["sources"]
    assert (s["a"]["rows"], s["a"]["sampled"], s["a"]["unique"], s["a"]["repeated"]) == (
        40, 30, 30, 0)
    assert (s["b"]["rows"], s["b"]["sampled"], s["b"]["repeated"]) == (15, 10, 0)
    assert report["train"]["kept"] == 40 and report["validation"]["kept"] == 11
    a_text = tok.decode(next(e for e in train if e["source"] == "a")["input_ids"])
    b_text = tok.decode(next(e for e in train if e["source"] == "b")["input_ids"])
    assert "### Instruction:" in a_text and "<|im_start|>" not in a_text  # a's template
    assert "<|im_start|>system\nBe brief." in b_text and "### Instruction" not in b_text
    (again, _, _), _ = _prepare(tiny_chat_model_dir, data)
    assert again == train

    # default size = the sources' training rows (40 + 15): b (weight 1 of 4) gets 14 examples
    # from its 15 rows, a gets 41 from its 40: all of them plus one repeat
    (train, _, report), _ = _prepare(tiny_chat_model_dir, {**data, "mixture_size": None})
    assert Counter(e["source"] for e in train) == {"a": 41, "b": 14}
    a = report["mixture"]["sources"]["a"]
    assert (a["unique"], a["repeated"]) == (40, 1)
    assert report["mixture"]["size"] == 55


def test_mixture_training_logs_per_source_validation(tiny_chat_model_dir, tmp_path):
    f = _mixture_files(tmp_path)
    mixture = [{"name": "a", "train": str(f["a"]), "validation": str(f["a_val"]), "weight": 1},
               {"name": "b", "train": str(f["b"]), "validation": str(f["b_val"]), "weight": 1}]
    out = tmp_path / "run"
    cfg = _run_cfg(tiny_chat_model_dir, out, {"mixture": mixture, "mixture_size": 16},
                   max_steps=3, eval_every=1, best_metric="val_loss/b")
    summary = peftlab.train(cfg, progress=False)
    evals = [r for r in summary.result.history if "val_loss" in r]
    assert len(evals) == 3
    sources = json.loads((out / "data_report.json").read_text())["mixture"]["sources"]
    n = {k: sources[k]["validation"]["target_tokens"] for k in ("a", "b")}
    for rec in evals:
        assert {"val_loss/a", "val_loss/b", "val_ppl/a", "val_ppl/b"} <= rec.keys()
        mixed = (rec["val_loss/a"] * n["a"] + rec["val_loss/b"] * n["b"]) / (n["a"] + n["b"])
        assert mixed == pytest.approx(rec["val_loss"], abs=2e-5)  # token-weighted average
        assert rec["val_loss/a"] != rec["val_loss/b"]
    # a per-source loss can select the best weights (lower is better)
    assert summary.result.best_value == min(r["val_loss/b"] for r in evals)
    assert len({r["val_loss/b"] for r in evals}) == 3
    report = (out / "report.md").read_text()
    assert "## validation per source" in report and "| a |" in report and "| b |" in report


# ----------------------------------------------------------------------------- evaluation


def _metrics_from_predictions(preds: list[dict], column: str) -> dict[str, float]:
    from peftlab.evaluation.text_metrics import text_metrics

    return text_metrics([p[column] for p in preds], [p["reference"] for p in preds])


def test_forgetting_and_generation_before_equal_after_with_no_learning(diverse_chat_model_dir,
                                                                      tmp_path):
    tiny_chat_model_dir = diverse_chat_model_dir  # non-empty, varied answers to compare
    train = _write_jsonl(tmp_path / "t.jsonl", _alpaca_rows(16, "t"))
    val_rows = _alpaca_rows(7, "v")
    val = _write_jsonl(tmp_path / "v.jsonl", val_rows)
    corpus = _corpus(tmp_path)
    out = tmp_path / "run"
    eval_ = {"forgetting_corpus": str(corpus), "forgetting_max_tokens": 200,
             "forgetting_window": 32, "forgetting_stride": 16, "batch_size": 3,
             "generate": True, "compare_base": True, "generate_max_rows": 5,
             "max_new_tokens": 4}
    # lr 1e-30: LoRA B moves by ~1e-30 from zero, far below fp32 resolution of the outputs
    cfg = _run_cfg(tiny_chat_model_dir, out, {"train": str(train), "validation": str(val)},
                   eval_, max_steps=2, lr=1e-30)
    summary = peftlab.train(cfg, progress=False)

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    expected = forgetting_report(base, tok, corpus, max_tokens=200, window=32, stride=16)
    f = summary.evaluation["forgetting"]
    assert f["tokens"] == expected["tokens"] == 199
    assert_close(f["perplexity_before"], expected["perplexity"], rtol=1e-6, atol=0)
    assert_close(f["perplexity_after"], f["perplexity_before"], rtol=1e-6, atol=0)
    assert f["delta"] == pytest.approx(f["perplexity_after"] - f["perplexity_before"])
    assert f["ratio"] == pytest.approx(f["perplexity_after"] / f["perplexity_before"])
    saved = json.loads((out / "eval_sft.json").read_text())
    assert saved["forgetting"]["perplexity_before"] == f["perplexity_before"]

    metrics = json.loads((out / "generation_metrics.json").read_text())
    assert set(metrics) == {"examples", "base", "tuned"} and metrics["examples"] == 5
    assert set(metrics["base"]) == set(metrics["tuned"]) == set(METRICS)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5
    assert all(set(p) == {"prompt", "reference", "prediction", "base_prediction"} for p in preds)
    assert [p["reference"] for p in preds] == [r["output"] for r in val_rows[:5]]
    # the base column is the untouched base model; no learning: tuned answers the same
    from peftlab.config import DataConfig
    from peftlab.data.sft import build_sft_examples

    examples, _ = build_sft_examples(val_rows[:5], tok, DataConfig(), 512, "v")
    direct = generation_report(base, tok, examples, max_new_tokens=4, batch_size=3, samples=None)
    assert [p["base_prediction"] for p in preds] == [s["prediction"] for s in direct["samples"]]
    assert [p["prediction"] for p in preds] == [p["base_prediction"] for p in preds]
    assert all(p["prediction"] for p in preds) and len({p["prediction"] for p in preds}) > 1
    assert metrics["base"] == metrics["tuned"] == {k: direct[k] for k in METRICS}
    assert metrics["tuned"] == _metrics_from_predictions(preds, "prediction")
    report = (out / "report.md").read_text()
    assert "## forgetting" in report and "| metric | base | tuned |" in report
    assert "| rougeL |" in report


def test_forgetting_after_reflects_training(diverse_chat_model_dir, tmp_path):
    tiny_chat_model_dir = diverse_chat_model_dir  # non-empty answers that training changes
    train = _write_jsonl(tmp_path / "t.jsonl", _alpaca_rows(16, "t"))
    corpus = _corpus(tmp_path)
    out = tmp_path / "run"
    eval_ = {"forgetting_corpus": str(corpus), "forgetting_max_tokens": 150,
             "forgetting_window": 64, "generate": True, "generate_max_rows": None,
             "max_new_tokens": 3, "compare_base": True}
    cfg = _run_cfg(tiny_chat_model_dir, out, {"train": str(train), "validation_split": 0.25},
                   eval_, max_steps=4, lr=1e-2)  # 2e-2 teaches it to stop at once: ''
    summary = peftlab.train(cfg, progress=False)
    f = summary.evaluation["forgetting"]
    assert f["stride"] == 32 and f["tokens"] == 149  # default stride: window // 2
    assert abs(f["relative_change"]) > 1e-4
    assert f["relative_change"] == pytest.approx(f["perplexity_after"] / f["perplexity_before"] - 1)
    model, tok = peftlab.load(str(tiny_chat_model_dir), adapter=out / "adapter")
    after = forgetting_report(model, tok, corpus, max_tokens=150, window=64, stride=32)
    assert_close(f["perplexity_after"], after["perplexity"], rtol=1e-5, atol=0)
    metrics = json.loads((out / "generation_metrics.json").read_text())
    assert set(metrics) == {"examples", "base", "tuned"} and metrics["examples"] == 4  # all 4
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4
    assert set(preds[0]) == {"prompt", "reference", "prediction", "base_prediction"}
    assert all(p["prediction"] and p["base_prediction"] for p in preds)
    assert any(p["prediction"] != p["base_prediction"] for p in preds)  # training shows
    # the saved scores are those of the saved answers
    assert metrics["tuned"] == _metrics_from_predictions(preds, "prediction")
    assert metrics["base"] == _metrics_from_predictions(preds, "base_prediction")


def test_peftlab_eval_reports_forgetting_and_generation(tiny_chat_model_dir, tmp_path, capsys):
    from peftlab.cli import main

    train = _write_jsonl(tmp_path / "t.jsonl", _alpaca_rows(12, "t"))
    val = _write_jsonl(tmp_path / "v.jsonl", _alpaca_rows(3, "v"))
    corpus = _corpus(tmp_path)
    out = tmp_path / "run"
    cfg = _run_cfg(tiny_chat_model_dir, out, {"train": str(train), "validation": str(val)},
                   max_steps=2, lr=2e-2)
    peftlab.train(cfg, progress=False)
    cfg["eval"] = {"forgetting_corpus": str(corpus), "forgetting_max_tokens": 100,
                   "forgetting_window": 32, "generate": True, "compare_base": True,
                   "max_new_tokens": 3}
    results = peftlab.evaluate(cfg)
    f = results["forgetting"]
    assert f["perplexity_before"] == results["base"]["forgetting"]["perplexity"]
    assert f["perplexity_after"] == results["adapter"]["forgetting"]["perplexity"]
    assert set(results["generation"]) == {"examples", "base", "tuned"}
    assert len((out / "eval_predictions.jsonl").read_text().splitlines()) == 3
    assert (out / "eval_generation_metrics.json").is_file()

    config_path = tmp_path / "cfg.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["eval", str(config_path)]) == 0
    printed = capsys.readouterr().out
    assert "forgetting (" in printed and "| metric | base | tuned |" in printed
