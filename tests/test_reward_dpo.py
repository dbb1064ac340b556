"""Preference data parsing, reward modelling and DPO on the tiny random Llama.

The pairs are easy on purpose (chosen = the demo answer, rejected = a fixed non-answer),
so a few steps on 16 pairs must move the reward model and the DPO margin.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from peftlab.config import DataConfig, from_dict
from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.preference import (
    build_preference_examples,
    encode_exchange,
    parse_hh_transcript,
    record_to_pair,
    record_to_prompt,
)
from peftlab.data.readers import DataError
from peftlab.lab.demo_data import generate_demo_data
from peftlab.models import load_model, load_tokenizer
from peftlab.models.lm import completion_logps
from peftlab.tasks import build_task
from peftlab.training.recipe import run_training


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs use train.num_threads=1 (tiny ops: extra threads only add contention on a shared
    CPU, ~10x slower under load); the recipe sets it process-wide, so put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


HH_CHOSEN = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
             "\n\nHuman: And of Italy?\n\nAssistant: Rome is the capital of Italy.")
HH_REJECTED = ("\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
               "\n\nHuman: And of Italy?\n\nAssistant: I would rather not say.")


# ----------------------------------------------------------------------------- parsing


def test_hh_rlhf_transcripts_become_prompt_and_final_answers():
    pair = record_to_pair({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, DataConfig(), "hh:1")
    assert pair.prompt == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert pair.chosen == "Rome is the capital of Italy."
    assert pair.rejected == "I would rather not say."
    # an HH-style prompt string waiting for its answer (trailing empty Assistant turn)
    prompt = parse_hh_transcript("\n\nHuman: Hi there\n\nAssistant:", "x:1")
    assert prompt == [{"role": "user", "content": "Hi there"}]


def test_preference_row_shapes_and_errors():
    cfg = DataConfig()
    plain = record_to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, cfg, "f:1")
    assert (plain.prompt, plain.chosen, plain.rejected) == (
        [{"role": "user", "content": "2+2?"}], "4", "5")
    conv = {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "5"}]}
    assert record_to_pair(conv, cfg, "f:2") == plain
    trl = {"prompt": [{"role": "user", "content": "2+2?"}],
           "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    assert record_to_pair(trl, cfg, "f:3") == plain
    with pytest.raises(DataError, match=r"f:4: field 'rejected' is missing"):
        record_to_pair({"prompt": "q", "chosen": "a"}, cfg, "f:4")
    other = HH_REJECTED.replace("And of Italy?", "And of Spain?")
    with pytest.raises(DataError, match=r"hh:7: .*differ before the final assistant turn"):
        record_to_pair({"chosen": HH_CHOSEN, "rejected": other}, cfg, "hh:7")
    with pytest.raises(DataError, match=r"f:5: .*not an HH-RLHF transcript"):
        record_to_pair({"chosen": "just text", "rejected": "more text"}, cfg, "f:5")
    custom = DataConfig(prompt_field="q", chosen_field="good", rejected_field="bad")
    assert record_to_pair({"q": "2+2?", "good": "4", "bad": "5"}, custom, "f:6") == plain
    # prompts for PPO from any row shape
    assert record_to_prompt({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, cfg, "p:1")[-1] == {
        "role": "user", "content": "And of Italy?"}
    assert record_to_prompt({"instruction": "Say hi", "output": "hi"}, cfg, "p:2") == [
        {"role": "user", "content": "Say hi"}]


def test_labels_cover_only_the_final_answer(tiny_chat_model_dir):
    tok = load_tokenizer(str(tiny_chat_model_dir))
    pair = record_to_pair({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, DataConfig(), "hh:1")
    enc = encode_exchange(pair.prompt, pair.chosen, tok)
    labelled = [t for t in enc["labels"] if t != IGNORE_INDEX]
    text = tok.decode(labelled)
    assert text.startswith("Rome is the capital of Italy.") and "Paris" not in text
    # labels are one contiguous run at the end (answer + end-of-turn marker)
    first = next(i for i, t in enumerate(enc["labels"]) if t != IGNORE_INDEX)
    assert all(t != IGNORE_INDEX for t in enc["labels"][first:-1])


# ----------------------------------------------------------------------------- training


def _write_pairs(path: Path, n: int = 20) -> Path:
    rows = generate_demo_data(seed=0)["train"][:n]
    lines = [json.dumps({"prompt": r["instruction"], "chosen": r["output"],
                         "rejected": "I do not know, sorry."}) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(model_dir: Path, data: Path, out: Path, task: str, **extra) -> dict:
    train = {"epochs": 4, "batch_size": 8, "lr": 1e-2, "precision": "fp32", "log_every": 1,
             "warmup_ratio": 0.0, "scheduler": "constant", "num_threads": 1,
             **extra.pop("train", {})}
    return {"model": str(model_dir), "task": task,
            "method": {"name": "lora", "r": 8, "alpha": 16},
            "data": {"train": str(data), "validation_split": 0.2},
            "train": train, "output_dir": str(out), **extra}


def test_reward_model_learns_pairs_and_saves_its_head(tiny_chat_model_dir, tmp_path):
    from peftlab.tasks.ppo.rewards import RewardModelScorer

    data = _write_pairs(tmp_path / "pairs.jsonl")
    cfg = from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "rm", "reward"))
    tok = load_tokenizer(cfg.model)
    prepared = build_task(cfg, tok)
    assert prepared.model_kind == "sequence_classification"
    assert prepared.model_kwargs == {"num_labels": 1}
    model, _ = load_model(cfg.model, kind="sequence_classification", num_labels=1)
    task, train = prepared.task, prepared.train
    before = task.metrics(model, train, 8, "fp32")
    summary = run_training(cfg, progress=False, model=model, tokenizer=tok)
    after = task.metrics(model, train, 8, "fp32")
    assert after["accuracy"] >= 0.9, (before, after)
    assert after["margin"] > before["margin"] + 1.0, (before, after)
    val = [r for r in summary.result.history if "val_accuracy" in r]
    assert val and {"val_margin", "val_chosen_score", "val_rejected_score"} <= set(val[-1])

    adapter = tmp_path / "rm" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert_close(tensors["base_model.model.score.weight"], model.score.weight.detach())
    # the reward model loads back for PPO and scores exactly as the trained model
    scorer = RewardModelScorer(tmp_path / "rm")
    rows = [json.loads(x) for x in data.read_text().splitlines()[:4]]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    got = scorer(prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    batch = task.collate(build_preference_examples(rows, tok, cfg.data, 512, "x")[0])
    with torch.no_grad():
        model.eval()
        c, r = task.scores(model, batch)
    assert_close(got, torch.cat([c, r]), atol=1e-5, rtol=1e-5)


def _fixed_batch(task, examples):
    return task.collate(examples[:4])


def test_dpo_reference_is_the_frozen_base_and_margin_grows(tiny_chat_model_dir, tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl")
    cfg = from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "dpo", "dpo",
                         dpo={"beta": 0.5}))
    tok = load_tokenizer(cfg.model)
    prepared = build_task(cfg, tok)
    task, train = prepared.task, prepared.train
    batch = _fixed_batch(task, train)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    base, _ = load_model(cfg.model)
    with torch.no_grad():
        base_logps = completion_logps(base.eval(), *args)

    model, _ = load_model(cfg.model)
    summary = run_training(cfg, progress=False, model=model, tokenizer=tok)
    assert summary.result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    with torch.no_grad():
        ref_after = task.reference_logps(model, batch)
        policy_after = completion_logps(model.eval(), *args)
    # the reference is bit-for-bit the untouched base model; the policy moved
    assert torch.equal(ref_after, base_logps)
    assert (policy_after - base_logps).abs().max() > 0.5
    n = len(batch["ids"])
    gain = (policy_after[:n] - base_logps[:n]) - (policy_after[n:] - base_logps[n:])
    assert (gain > 0).all(), gain
    metrics = task.metrics(model, train, 8, "fp32")
    assert metrics["reward_accuracy"] >= 0.9 and metrics["margin"] > 1.0, metrics
    assert metrics["chosen_reward"] > metrics["rejected_reward"]
    val = [r for r in summary.result.history if "val_reward_accuracy" in r]
    assert val and {"val_chosen_reward", "val_rejected_reward", "val_margin"} <= set(val[-1])


def test_dpo_precomputed_reference_is_cached_and_matches(tiny_chat_model_dir, tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl", n=10)
    raw = _cfg(tiny_chat_model_dir, data, tmp_path / "pre", "dpo",
               dpo={"beta": 0.5, "reference": "precomputed", "loss_type": "ipo"},
               train={"max_steps": 2})
    cfg = from_dict(raw)
    tok = load_tokenizer(cfg.model)
    summary = run_training(cfg, progress=False, tokenizer=tok)
    # IPO at the start (policy == reference, h = 0): (0 - 1/(2 beta))^2 = 1
    assert summary.result.history[0]["loss"] == pytest.approx(1.0, abs=1e-4)
    cache = tmp_path / "pre" / "reference_logps.safetensors"
    cached = load_file(str(cache))["reference_logps"]
    prepared = build_task(cfg, tok)
    examples = prepared.train + prepared.validation
    assert cached.shape == (len(examples), 2)
    base, _ = load_model(cfg.model)
    batch = prepared.task.collate(examples)
    with torch.no_grad():
        logps = completion_logps(base.eval(), batch["input_ids"], batch["attention_mask"],
                                 batch["labels"])
    n = len(examples)
    assert_close(cached, torch.stack([logps[:n], logps[n:]], dim=1), atol=1e-4, rtol=1e-5)
    # a second task object reads the cache instead of recomputing (a model is not needed)
    again = build_task(cfg, tok).task
    assert torch.equal(again.reference_logps(None, prepared.task.collate(examples[:3])),
                       torch.cat([cached[:3, 0], cached[:3, 1]]))


def test_frozen_reference_needs_a_switchable_method(tiny_chat_model_dir, tmp_path):
    from peftlab.config import ConfigError

    data = _write_pairs(tmp_path / "pairs.jsonl", n=4)
    raw = _cfg(tiny_chat_model_dir, data, tmp_path / "o", "dpo")
    raw["method"] = {"name": "full"}
    with pytest.raises(ConfigError, match="dpo.reference 'disabled_adapter'.*'full' cannot"):
        build_task(from_dict(raw), load_tokenizer(str(tiny_chat_model_dir)))
    raw["task"], raw["ppo"] = "ppo", {"reward_function": "math:fsum"}
    with pytest.raises(ConfigError, match="task: ppo: .*'full' cannot"):
        build_task(from_dict(raw), load_tokenizer(str(tiny_chat_model_dir)))
    # the precomputed reference works with any method: it is the policy before training
    raw["task"], raw["dpo"] = "dpo", {"reference": "precomputed"}
    assert build_task(from_dict(raw), load_tokenizer(str(tiny_chat_model_dir))).train
