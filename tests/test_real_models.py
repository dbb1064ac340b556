"""Integration: the embedded SmolLM2 learns from real instruction data (Alpaca subset).

Needs ../shared/data (present in CI); skipped with a reason on a fresh clone without it.
"""

from __future__ import annotations

import json

import pytest
import torch

from peftlab.config import from_dict
from peftlab.evaluation.loss import evaluate_loss
from peftlab.methods import get_method
from peftlab.models import load_model
from peftlab.runtime.precision import prepare_precision, resolve_precision
from peftlab.tasks import build_task
from peftlab.training.trainer import Trainer

from .conftest import SHARED_DATA

ALPACA = SHARED_DATA / "alpaca" / "alpaca_5000.jsonl"

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not ALPACA.exists(), reason=f"real data not found at {ALPACA}")
def test_lora_lowers_validation_loss_on_alpaca(tmp_path):
    rows = [json.loads(x) for x in ALPACA.read_text().splitlines()[:400]]
    short = [r for r in rows if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 400]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:96]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[96:128]))
    cfg = from_dict({
        "model": "smollm2-135m-instruct",
        "method": {"name": "lora", "r": 16, "alpha": 32},
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl")},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "max_length": 256,
                  "precision": "auto", "log_every": 1},
        "output_dir": str(tmp_path / "run"),
    })
    cfg.train.precision = resolve_precision(cfg.train.precision)
    torch.manual_seed(0)
    model, tok = load_model(cfg.model)
    prepared = build_task(cfg, tok)
    task, train, val = prepared.task, prepared.train, prepared.validation
    get_method("lora").apply(model, cfg.method, "default")
    prepare_precision(model, cfg.train.precision)
    before = evaluate_loss(model, task, val, 16, cfg.train.precision)
    result = Trainer(model, task, train, val, cfg.train, tmp_path / "run", progress=False).fit()
    after = evaluate_loss(model, task, val, 16, cfg.train.precision)
    assert result.steps == 12
    assert after < before - 0.02, (before, after)
