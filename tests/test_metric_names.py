"""``Task.metric_names`` (checked against ``train.best_metric`` before training starts) lists
exactly the metrics that ``Task.metrics`` returns, for every task that has metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.config import from_dict
from peftlab.methods import get_method
from peftlab.models import load_model, load_tokenizer
from peftlab.tasks import build_task


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Say {i}", "chosen": f"{i} indeed", "rejected": "no"} for i in range(n)]


def _configs(tmp: Path, demo: dict[str, Path]) -> dict[str, dict]:
    texts = [{"text": f"item {i} is {'good' if i % 2 else 'bad'}",
              "label": "pos" if i % 2 else "neg"} for i in range(12)]
    return {
        "classification": {"task": "classification",
                           "data": {"train": _jsonl(tmp / "c.jsonl", texts),
                                    "validation_split": 0.5}},
        "reward": {"task": "reward", "data": {"train": _jsonl(tmp / "r.jsonl", _pairs(8)),
                                              "validation_split": 0.5}},
        "dpo": {"task": "dpo", "data": {"train": _jsonl(tmp / "d.jsonl", _pairs(8)),
                                        "validation_split": 0.5}},
        **{task: {"task": task, "data": {"train": _jsonl(tmp / f"{task}.jsonl", _pairs(8)),
                                         "validation_split": 0.5}}
           for task in ("kto", "orpo", "simpo")},
        "kto unpaired": {"task": "kto", "data": {"train": _jsonl(tmp / "u.jsonl", [
            {"prompt": f"Say {i}", "completion": f"{i}", "label": i % 2 == 0}
            for i in range(8)]), "validation_split": 0.5}},
        "sft mixture": {"task": "sft", "data": {"mixture": [
            {"name": "a", "train": str(demo["train"]), "validation": str(demo["validation"]),
             "max_rows": 8},
            {"name": "b", "train": str(demo["train"]), "validation": str(demo["validation"]),
             "max_rows": 8}]}},
    }


@pytest.mark.parametrize("name", ["classification", "reward", "dpo", "kto", "kto unpaired",
                                  "orpo", "simpo", "sft mixture"])
def test_metric_names_match_metrics(name, tiny_chat_model_dir, demo_data_dir, tmp_path):
    raw = {"model": str(tiny_chat_model_dir), "method": {"name": "lora", "r": 2},
           "output_dir": str(tmp_path / "out"), **_configs(tmp_path, demo_data_dir)[name]}
    cfg = from_dict(raw)
    prepared = build_task(cfg, load_tokenizer(cfg.model))
    model, _ = load_model(cfg.model, kind=prepared.model_kind, **prepared.model_kwargs)
    get_method(cfg.method_name).apply(model, cfg.method, "default")
    task, val = prepared.task, prepared.validation
    if hasattr(task, "prepare_model"):
        task.prepare_model(model)
    assert val
    names = task.metric_names(val)
    assert names  # every one of these tasks reports something beyond the loss
    assert sorted(names) == sorted(task.metrics(model, val, 4, "fp32"))
