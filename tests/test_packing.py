"""SFT example construction: packing (first-fit decreasing, no cross-example attention,
same loss as unpacked) and prompt templates (Alpaca, Jinja files and inline strings)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.config import ConfigError, DataConfig, from_dict
from peftlab.data.collate import IGNORE_INDEX, pad_collate
from peftlab.data.packing import collate_packed, first_fit_decreasing, pack_examples
from peftlab.data.readers import DataError
from peftlab.data.templates import (
    ALPACA_TEMPLATE,
    PromptTemplate,
    load_template,
    template_variables,
    tokenize_prompt_answer,
)
from peftlab.methods.prompt_tuning import PromptTuningConfig, apply_prompt_tuning
from peftlab.tasks.sft.data import prepare_sft_data
from peftlab.tasks.sft.task import SFTTask, build_sft_task

# ----------------------------------------------------------------------------- bin packing


def _naive_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if room >= lengths[i]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def test_first_fit_decreasing_by_hand_and_against_naive():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 7) == [[0, 4], [1, 2], [3, 5, 6]]
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 80))]
        assert first_fit_decreasing(lengths, 64) == _naive_ffd(lengths, 64)
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        first_fit_decreasing([3, 9], 8)


def _examples(seed: int = 0, lengths=(5, 9, 3, 12, 7, 4, 6, 11, 2)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    out[0]["labels"][0] = out[0]["input_ids"][0]  # a labelled first token must be dropped
    return out


def test_pack_examples_layout():
    examples = _examples()
    packed, stats = pack_examples(examples, 24)
    assert stats["examples"] == 9 and stats["packed_rows"] == len(packed) == 3
    assert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) <= 24
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        bounds = starts + [len(row["input_ids"])]
        for s, e in zip(bounds, bounds[1:], strict=False):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE_INDEX  # never predicted across the boundary
            seen.append((row["input_ids"][s:e], row["labels"][s + 1:e]))
    original = sorted((e["input_ids"], e["labels"][1:]) for e in examples)
    assert sorted(seen) == original


def test_collate_packed_pads_as_a_separate_sequence():
    packed, _ = pack_examples(_examples(), 24)
    batch = collate_packed(packed, pad_id=0)
    short = min(range(3), key=lambda r: len(packed[r]["input_ids"]))
    n = len(packed[short]["input_ids"])
    assert batch["position_ids"][short, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
    assert int(batch["attention_mask"].sum()) == sum(len(p["input_ids"]) for p in packed)
    assert batch["num_target_tokens"] == SFTTask(0).count(batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_grads_equal_unpacked(tiny_chat_model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, attn_implementation=attn)
    task = SFTTask(pad_id=0)
    examples = _examples(seed=1)
    packed, _ = pack_examples(examples, 32)
    assert len(packed) < len(examples)

    def run(batch):
        model.zero_grad()
        loss, n = task.loss(model, batch)
        loss.backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_loss, ref_n, ref_grads = run(pad_collate(examples, 0))
    loss, n, grads = run(task.collate(packed))
    assert n == ref_n == task.count(task.collate(packed))
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)

    # The test can fail: without the position reset the examples see each other.
    leaky = [{**p, "position_ids": list(range(len(p["input_ids"])))} for p in packed]
    bad_loss, _, _ = run(task.collate(leaky))
    assert abs(float(bad_loss) - float(ref_loss)) > 1e-2


def test_sft_task_rejects_packing_with_virtual_tokens(tiny_chat_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=2))
    batch = SFTTask(0).collate(pack_examples(_examples(), 24)[0])
    with pytest.raises(ValueError, match="can't be used with prompt tuning"):
        SFTTask(0).loss(model, batch)


def _alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Say the number {i}", "input": "" if i % 2 else f"n={i}",
             "output": f"The number is {i}."} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prepare_sft_data_packs_train_only(tmp_path, tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    raw = {"model": str(tiny_chat_model_dir),
           "data": {"train": _write(tmp_path / "t.jsonl", _alpaca_rows(12)),
                    "validation_split": 0.25, "packing": True},
           "train": {"max_length": 96}}
    train, val, report = prepare_sft_data(from_dict(raw), tok)
    raw["data"]["packing"] = False
    plain_train, plain_val, _ = prepare_sft_data(from_dict(raw), tok)
    assert val == plain_val and all("position_ids" not in v for v in val)
    assert len(train) == report["packing"]["packed_rows"] < len(plain_train)
    assert sum(len(t["input_ids"]) for t in train) == sum(len(t["input_ids"]) for t in plain_train)
    raw["data"]["packing"] = True
    raw["method"] = {"name": "prompt_tuning"}
    with pytest.raises(ConfigError, match="data.packing can't be used"):
        build_sft_task(from_dict(raw), tok)


def test_training_run_with_packing(tmp_path, tiny_chat_model_dir):
    from peftlab.training.recipe import run_training

    cfg = from_dict({
        "model": str(tiny_chat_model_dir), "method": {"name": "lora", "r": 2},
        "data": {"train": _write(tmp_path / "t.jsonl", _alpaca_rows(16)),
                 "validation_split": 0.25, "packing": True, "template": "alpaca"},
        "train": {"max_steps": 2, "batch_size": 2, "max_length": 256, "precision": "fp32",
                  "log_every": 1},
        "output_dir": str(tmp_path / "run"),
    })
    summary = run_training(cfg, progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["packing"]["examples"] == 12 and report["template"] == "alpaca"
    assert report["packing"]["packed_rows"] < 12
    assert summary.result.steps == 2


# ----------------------------------------------------------------------------- templates


def test_alpaca_template_text():
    t = load_template("alpaca")
    assert t.template.render(instruction="Add 2 and 3", input="") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3\n\n### Response:\n")
    assert t.template.render(instruction="Add", input="2, 3") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd\n\n### Input:\n2, 3\n\n### Response:\n")


def test_template_labels_only_the_answer(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    prompt = PromptTemplate(ALPACA_TEMPLATE, "alpaca").render(
        {"instruction": "Say the number 3", "input": ""})
    ex = tokenize_prompt_answer(prompt, "The number is 3.", tok)
    labelled = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert labelled[-1] == tok.eos_token_id
    assert tok.decode(labelled[:-1]) == "The number is 3."
    assert tok.decode(ex["input_ids"][:len(ex["input_ids"]) - len(labelled)]) == prompt


def test_template_from_file_and_inline(tmp_path):
    cfg = DataConfig()
    row = {"instruction": "Hi", "input": "", "output": "Hello", "lang": "en"}
    variables, answer = template_variables(row, cfg, "f:1")
    assert answer == "Hello"
    path = tmp_path / "p.jinja"
    path.write_text("[{{ lang }}] {{ instruction }}\nA:")
    assert load_template(str(path)).render(variables) == "[en] Hi\nA:"
    assert load_template("Q: {{ row.instruction }} A:").render(variables) == "Q: Hi A:"
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                         {"role": "assistant", "content": "A1"},
                         {"role": "user", "content": "U2"},
                         {"role": "assistant", "content": "A2"}]}
    variables, answer = template_variables(chat, cfg, "f:2")
    assert answer == "A2" and variables["instruction"] == "U2" and variables["system"] == "S"
    assert len(variables["messages"]) == 4


def test_template_errors_name_the_row_and_key(tmp_path):
    with pytest.raises(DataError, match=r"f:7: data.template \(inline\) failed: .*'missing'"):
        load_template("{{ missing }}").render({"instruction": "x"}, "f:7")
    with pytest.raises(DataError, match="f:1"):  # the sandbox blocks Python internals
        load_template("{{ instruction.__class__.__mro__[1].__subclasses__() }}").render(
            {"instruction": "x"}, "f:1")
    with pytest.raises(ConfigError, match="template file not found"):
        load_template(str(tmp_path / "nope.jinja"))
    with pytest.raises(ConfigError, match="not a built-in template"):
        load_template("alpacca")
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        load_template("{{ oops ")


def test_prepare_sft_data_with_template(tmp_path, tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    cfg = from_dict({"model": str(tiny_chat_model_dir),
                     "data": {"train": _write(tmp_path / "t.jsonl", _alpaca_rows(3)),
                              "template": "alpaca"}})
    train, _, report = prepare_sft_data(cfg, tok)
    text = tok.decode(train[0]["input_ids"])
    assert text.startswith("Below is an instruction") and "<|im_start|>" not in text
    assert report["template"] == "alpaca" and report["train"]["kept"] == 3
