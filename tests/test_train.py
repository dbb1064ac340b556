"""Trainer behaviour on a tiny random Llama: loss falls, outputs exist, resume is exact,
gradient accumulation is exact, the label-only LM head equals the full forward loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.config import from_dict
from peftlab.data.sft import build_sft_examples, ensure_chat_template
from peftlab.models import load_model
from peftlab.runtime import checkpoint as ckpt
from peftlab.tasks.sft.task import SFTTask


def _cfg(model_dir: Path, data: dict[str, Path], out: Path, **train) -> dict:
    return {
        "model": str(model_dir),
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": train.pop("dropout", 0.0)},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                 "max_rows": train.pop("max_rows", 64)},
        "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                  "log_every": 1, **train},
        "output_dir": str(out),
    }


def test_training_reduces_loss_and_writes_outputs(tiny_chat_model_dir, demo_data_dir, tmp_path):
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "run", epochs=3, max_rows=96,
               precision="bf16")
    summary = peftlab.train(cfg, progress=False)
    losses = [r["loss"] for r in summary.result.history if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    val = [r["val_loss"] for r in summary.result.history if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "data_report.json", "report.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "checkpoints/best/trainable.safetensors"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and "tokens_per_s" in lines[0]
    assert json.loads((out / "data_report.json").read_text())["train"]["kept"] == 96


def test_resume_continues_to_the_same_result(tiny_chat_model_dir, demo_data_dir, tmp_path):
    # dropout > 0 makes the result depend on the restored RNG state too
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "a", max_steps=6, save_every=3,
               dropout=0.1, batch_size=4)
    peftlab.train(cfg, progress=False)
    straight = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))

    cfg_b = dict(cfg, output_dir=str(tmp_path / "b"))
    peftlab.train(cfg_b, progress=False)
    ckpt_dir = tmp_path / "b" / "checkpoints"
    # simulate a crash after step 3: drop the later checkpoint, leave a half-written one
    for p in ckpt_dir.glob("step-0000006*"):
        __import__("shutil").rmtree(p)
    (ckpt_dir / "step-0000005.tmp").mkdir()
    assert ckpt.latest_checkpoint(ckpt_dir).name == "step-0000003"
    summary = peftlab.train(cfg_b, resume=True, progress=False)
    assert summary.result.steps == 6
    resumed = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_equals_large_batch(tiny_chat_model_dir, demo_data_dir, tmp_path):
    results = []
    for bs, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / f"bs{bs}", max_rows=8,
                   batch_size=bs, grad_accum=accum, max_steps=1, warmup_steps=0)
        peftlab.train(cfg, progress=False)
        results.append(load_file(str(tmp_path / f"bs{bs}" / "adapter" /
                                     "adapter_model.safetensors")))
    for other in results[1:]:
        for key in results[0]:
            torch.testing.assert_close(other[key], results[0][key], rtol=1e-4, atol=1e-6)


def test_label_only_head_equals_full_forward_loss(tiny_chat_model_dir, demo_data_dir):
    model, tok = load_model(str(tiny_chat_model_dir))
    ensure_chat_template(tok)
    cfg = from_dict({"model": "x", "data": {"train": str(demo_data_dir["train"])}})
    rows = [json.loads(x) for x in demo_data_dir["train"].read_text().splitlines()[:6]]
    examples, _ = build_sft_examples(rows, tok, cfg.data, 256, source="t")
    task = SFTTask(pad_id=tok.pad_token_id, chunk_size=7)  # several chunks
    batch = task.collate(examples)
    loss_sum, n = task.loss(model, batch)
    assert n == task.count(batch) > 0
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-5)


def test_bf16_path_tracks_fp32(tiny_chat_model_dir, demo_data_dir, tmp_path):
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / precision, max_steps=8,
                   precision=precision)
        summary = peftlab.train(cfg, progress=False)
        curves[precision] = [r["loss"] for r in summary.result.history if "loss" in r]
    for a, b in zip(curves["fp32"], curves["bf16"], strict=True):
        assert abs(a - b) < 0.05 * abs(a)


def test_no_trainable_params_and_empty_data_are_clear_errors(tiny_chat_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = {"model": str(tiny_chat_model_dir), "data": {"train": str(empty)},
           "output_dir": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="empty"):
        peftlab.train(cfg, progress=False)


class _ScriptedMetricTask(SFTTask):
    """SFT loss, plus a scripted 'accuracy' so best-keeping and early stopping are testable."""

    def __init__(self, pad_id, values):
        super().__init__(pad_id)
        self.values = iter(values)

    def metrics(self, model, examples, batch_size, precision):
        return {"accuracy": next(self.values)}


def test_best_metric_and_early_stopping(tiny_chat_model_dir, demo_data_dir, tmp_path):
    from peftlab.methods import get_method
    from peftlab.training.trainer import Trainer

    cfg = from_dict(_cfg(tiny_chat_model_dir, demo_data_dir, tmp_path, max_steps=10,
                         eval_every=1, best_metric="val_accuracy", early_stopping_patience=2))
    model, tok = load_model(str(tiny_chat_model_dir))
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in demo_data_dir["train"].read_text().splitlines()[:32]]
    examples, _ = build_sft_examples(rows, tok, cfg.data, 256, source="t")
    get_method("lora").apply(model, cfg.method, "default")
    task = _ScriptedMetricTask(tok.pad_token_id, [0.5, 0.6, 0.4, 0.3, 0.9])
    trainer = Trainer(model, task, examples, examples[:8], cfg.train, tmp_path, progress=False)
    result = trainer.fit()
    assert result.steps == 4 and result.best_step == 2 and result.best_value == 0.6
    best = load_file(str(tmp_path / "checkpoints" / "best" / "trainable.safetensors"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), best[name])
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in logged if "val_accuracy" in r] == [0.5, 0.6, 0.4, 0.3]


def test_compiled_blocks_train_like_eager(tiny_chat_model_dir, demo_data_dir, tmp_path):
    """train.compile (inductor blocks) on batches of varying length: same losses as eager."""
    histories = []
    for compile_ in (False, True):
        cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / f"c{compile_}", max_steps=3,
                   batch_size=4, compile=compile_)
        summary = peftlab.train(cfg, progress=False)
        histories.append([r for r in summary.result.history if "loss" in r or "val_loss" in r])
    eager, compiled = histories
    assert len(eager) == len(compiled) >= 3
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a, b)
    with pytest.raises(peftlab.ConfigError, match="pick one"):
        peftlab.train(_cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "both", max_steps=1,
                           compile=True, activation_checkpointing=True), progress=False)
