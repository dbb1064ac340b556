"""ORPO, SimPO and KTO end to end on the tiny random Llama: each trains from a YAML config
through ``peftlab train``, moves the preference the way it should, saves, and reloads into
the model it trained; KTO's unpaired data (and HH-style pairs split in two) with its errors.

The pairs are easy on purpose (chosen = the demo answer, rejected = a fixed non-answer), so
a few steps on 16 pairs must separate them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.api import load
from peftlab.cli import main
from peftlab.config import ConfigError, DataConfig, from_dict
from peftlab.data.readers import DataError
from peftlab.lab.demo_data import generate_demo_data
from peftlab.models import load_model, load_tokenizer
from peftlab.tasks import build_task
from peftlab.tasks.kto.config import KTOConfig
from peftlab.tasks.kto.data import build_kto_examples, desirable, record_to_unpaired
from peftlab.tasks.kto.task import KTOTask

HH_CHOSEN = "\n\nHuman: What is the capital of Italy?\n\nAssistant: Rome."
HH_REJECTED = "\n\nHuman: What is the capital of Italy?\n\nAssistant: I would rather not say."


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _write_pairs(path: Path, n: int = 20) -> Path:
    rows = generate_demo_data(seed=0)["train"][:n]
    path.write_text("".join(json.dumps({"prompt": r["instruction"], "chosen": r["output"],
                                        "rejected": "I do not know, sorry."}) + "\n"
                            for r in rows))
    return path


def _cfg(model_dir: Path, data: Path, out: Path, task: str, **extra) -> dict:
    return {"model": str(model_dir), "task": task, "method": {"name": "lora", "r": 8, "alpha": 16},
            "data": {"train": str(data), "validation_split": 0.2},
            "train": {"epochs": 4, "batch_size": 8, "lr": 1e-2, "precision": "fp32",
                      "log_every": 1, "warmup_ratio": 0.0, "scheduler": "constant",
                      "num_threads": 1, **extra.pop("train", {})},
            "output_dir": str(out), **extra}


CASES = {
    "orpo": ({"orpo": {"beta": 0.5}}, "reward_accuracy", "margin"),
    "simpo": ({"simpo": {"beta": 2.0, "simpo_gamma": 0.5}}, "reward_accuracy", "margin"),
    "kto": ({"kto": {"beta": 0.5}, "train": {"batch_size": 16}}, "reward_accuracy", "margin"),
}


@pytest.mark.parametrize("task", list(CASES))
def test_trains_from_yaml_separates_pairs_and_reloads(task, tiny_chat_model_dir, tmp_path):
    extra, accuracy, margin = CASES[task]
    data = _write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / task
    raw = _cfg(tiny_chat_model_dir, data, out, task, **extra)
    config = tmp_path / f"{task}.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = from_dict(raw)
    tok = load_tokenizer(cfg.model)
    prepared = build_task(cfg, tok)
    base, _ = load_model(cfg.model)
    before = prepared.task.metrics(base, prepared.train, 8, "fp32")

    assert main(["train", str(config), "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0], losses
    model, _ = load(cfg.model, adapter=out / "adapter")
    after = prepared.task.metrics(model, prepared.train, 8, "fp32")
    assert after[accuracy] >= 0.9, (before, after)
    assert after[margin] > before[margin] + 0.1, (before, after)
    # the reloaded adapter is the trained one: it reproduces the run's last validation metrics
    logged = [r for r in lines if f"val_{margin}" in r][-1]
    again = prepared.task.metrics(model, prepared.validation, 8, "fp32")
    for key, value in again.items():
        assert value == pytest.approx(logged[f"val_{key}"], abs=2e-5), key
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "report.md").is_file()


def test_orpo_nll_is_on_the_answers_unless_asked(tiny_chat_model_dir, tmp_path):
    """Default: the SFT term is the chosen answers' NLL; nll_on_prompt adds the prompt."""
    data = _write_pairs(tmp_path / "pairs.jsonl", n=4)
    tok = load_tokenizer(str(tiny_chat_model_dir))
    model, _ = load_model(str(tiny_chat_model_dir))
    nll = {}
    for flag in (False, True):
        cfg = from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "o", "orpo",
                             orpo={"nll_on_prompt": flag}))
        prepared = build_task(cfg, tok)
        batch = prepared.task.collate(prepared.train)
        with torch.no_grad():
            nll[flag] = float(prepared.task.pair_terms(model, batch)["nll"])
            sums, counts = _answer_nll(model, batch)
        if not flag:
            assert nll[flag] == pytest.approx(sums / counts, rel=1e-5)
    assert nll[True] != pytest.approx(nll[False], rel=1e-3)


def _answer_nll(model, batch) -> tuple[float, float]:
    """The chosen rows' answer NLL, by the model's own HF loss (labels already mask prompts)."""
    n = len(batch["ids"])
    labels = batch["labels"][:n]
    out = model(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n],
                labels=labels)
    count = float((labels[:, 1:] != -100).sum())
    return float(out.loss) * count, count


# ----------------------------------------------------------------------------- KTO data


def test_kto_rows_unpaired_and_pairs_split_in_two(tiny_chat_model_dir):
    cfg = DataConfig()
    rows = record_to_unpaired({"prompt": "2+2?", "completion": "4", "label": True}, cfg, "f:1")
    assert rows == [([{"role": "user", "content": "2+2?"}], "4", True)]
    conv = {"prompt": [{"role": "user", "content": "2+2?"}],
            "completion": [{"role": "assistant", "content": "5"}], "label": "false"}
    assert record_to_unpaired(conv, cfg, "f:2")[0][1:] == ("5", False)
    hh = record_to_unpaired({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, cfg, "hh:1")
    assert [(answer, label) for _, answer, label in hh] == [("Rome.", True),
                                                            ("I would rather not say.", False)]
    assert desirable(1, "label", "x") and not desirable("No", "label", "x")

    tok = load_tokenizer(str(tiny_chat_model_dir))
    records = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
               {"prompt": "Say hi", "completion": "hi", "label": 0}]
    examples, stats = build_kto_examples(records, tok, cfg, 256, "mixed.jsonl")
    assert [(ex["label"], ex["pair"]) for ex in examples] == [(True, 0), (False, 0), (False, -1)]
    assert stats.kept == 3 and stats.rows == 2
    first = examples[0]
    assert tok.decode(first["completion_ids"]).startswith("Rome.")
    assert examples[0]["prompt_ids"] == examples[1]["prompt_ids"]  # one prompt, two answers
    # the KL batch pairs each prompt with the previous example's answer
    batch = KTOTask(tok.pad_token_id, KTOConfig()).collate(examples)
    row0 = batch["kl_input_ids"][0][batch["kl_attention_mask"][0].bool()].tolist()
    assert row0 == examples[0]["prompt_ids"] + examples[2]["completion_ids"]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "q", "completion": "a", "label": "maybe"},
     r"rows.jsonl:1: field 'label' must be true or false .*'maybe'"),
    ({"prompt": "q", "label": True}, r"rows.jsonl:1: field 'completion' is missing"),
    ({"prompt": "q", "completion": "  ", "label": True}, r"rows.jsonl:1: field 'completion' is empty"),
    ({"completion": "a", "label": True}, r"rows.jsonl:1: field 'prompt' is missing"),
    ({"prompt": "q", "completion": 3, "label": True},
     r"rows.jsonl:1: field 'completion' must be the answer"),
])
def test_kto_bad_rows_name_the_row(row, message, tiny_chat_model_dir):
    tok = load_tokenizer(str(tiny_chat_model_dir))
    with pytest.raises(DataError, match=message):
        build_kto_examples([row], tok, DataConfig(), 256, "rows.jsonl")
    kept, stats = build_kto_examples([row], tok, DataConfig(on_error="skip"), 256, "rows.jsonl")
    assert kept == [] and stats.dropped_invalid == 1


def test_kto_split_keeps_pairs_together_and_reports_balance(tiny_chat_model_dir, tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl")
    cfg = from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "o", "kto"))
    prepared = build_task(cfg, load_tokenizer(cfg.model))
    train_pairs = {ex["pair"] for ex in prepared.train}
    val_pairs = {ex["pair"] for ex in prepared.validation}
    assert not train_pairs & val_pairs and len(val_pairs) == 4
    assert prepared.report["train"]["desirable"] == prepared.report["train"]["undesirable"] == 16
    assert "reward_accuracy" in prepared.task.metric_names(prepared.validation)


def test_reference_free_objectives_take_any_method_kto_does_not(tiny_chat_model_dir, tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl", n=4)
    tok = load_tokenizer(str(tiny_chat_model_dir))
    for task in ("orpo", "simpo"):
        raw = _cfg(tiny_chat_model_dir, data, tmp_path / "o", task)
        raw["method"] = {"name": "full"}
        assert build_task(from_dict(raw), tok).train
    raw = _cfg(tiny_chat_model_dir, data, tmp_path / "o", "kto")
    raw["method"] = {"name": "full"}
    with pytest.raises(ConfigError, match="task: kto: .*'full' cannot"):
        build_task(from_dict(raw), tok)
    for section, bad in (("simpo", {"beta": 0}), ("orpo", {"beta": -1}),
                         ("kto", {"loss_type": "sigmoid"}), ("kto", {"desirable_weight": 0})):
        with pytest.raises(ConfigError, match=section):
            from_dict({"model": "x", section: bad})
