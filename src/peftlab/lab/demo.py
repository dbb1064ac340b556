"""`make demo`: teach the embedded SmolLM2 invented facts with LoRA and measure it.

Before/after on held-out *paraphrased* questions (keyword accuracy) and on validation
loss, with the same model object: base first, then the LoRA-tuned model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from peftlab.config import RunConfig, load_config
from peftlab.evaluation.generate import generate_replies
from peftlab.evaluation.loss import evaluate_loss
from peftlab.lab.demo_data import keyword_match, write_demo_data
from peftlab.models import load_model
from peftlab.runtime.precision import resolve_precision
from peftlab.tasks import build_task
from peftlab.training.recipe import run_training

DEMO_MODEL = "smollm2-135m-instruct"


def demo_config(data: dict[str, Path], output_dir: str | Path,
                overrides: list[str] | None = None) -> RunConfig:
    base = {
        "model": DEMO_MODEL,
        "task": "sft",
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                   "target_modules": "all-linear"},
        "data": {"train": str(data["train"]), "validation": str(data["validation"])},
        "train": {"epochs": 4, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.05,
                  "scheduler": "cosine", "max_length": 256, "precision": "auto",
                  "seed": 0, "log_every": 10},
        "eval": {"batch_size": 16, "max_new_tokens": 40},
        "output_dir": str(output_dir),
    }
    return load_config(overrides=overrides, base=base)


def _heldout(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _measure(model, tokenizer, task, val, heldout, cfg: RunConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    val_loss = evaluate_loss(model, task, val, cfg.eval.batch_size, cfg.train.precision)
    questions = [[{"role": "user", "content": r["instruction"]}] for r in heldout]
    answers = generate_replies(model, tokenizer, questions, max_new_tokens=cfg.eval.max_new_tokens,
                               batch_size=cfg.eval.batch_size, progress=True)
    hits = [keyword_match(a, r["keywords"]) for a, r in zip(answers, heldout, strict=True)]
    return {"val_loss": val_loss, "accuracy": sum(hits) / len(hits), "answers": answers,
            "hits": hits, "seconds": time.perf_counter() - t0}


def run_demo(output_dir: str | Path = "runs/demo", overrides: list[str] | None = None) -> dict:
    started = time.perf_counter()
    out = Path(output_dir)
    data = write_demo_data(out / "data")
    cfg = demo_config(data, out, overrides)
    heldout = _heldout(data["heldout"])
    print(f"demo: {DEMO_MODEL} + LoRA on {data['train']} "
          f"({len(heldout)} held-out paraphrased questions)")

    cfg.train.precision = resolve_precision(cfg.train.precision)
    model, tokenizer = load_model(cfg.model)
    prepared = build_task(cfg, tokenizer)
    task, val = prepared.task, prepared.validation
    print("measuring the base model ...")
    before = _measure(model, tokenizer, task, val, heldout, cfg)
    summary = run_training(cfg, model=model, tokenizer=tokenizer, overwrite=True)
    print("measuring the tuned model ...")
    after = _measure(model, tokenizer, task, val, heldout, cfg)
    total = time.perf_counter() - started

    rows = [("held-out keyword accuracy", f"{before['accuracy']:.1%}", f"{after['accuracy']:.1%}"),
            ("validation loss", f"{before['val_loss']:.3f}", f"{after['val_loss']:.3f}")]
    lines = ["", f"{'':<28}{'base':>10}{'tuned':>10}"]
    lines += [f"{name:<28}{b:>10}{a:>10}" for name, b, a in rows]
    lines.append(f"training: {summary.result.steps} steps in {summary.result.seconds:.0f} s, "
                 f"{summary.trainable_params:,} trainable parameters; demo total {total:.0f} s")
    for i in _sample_indices(after["hits"], before["hits"]):
        lines += ["", f"Q: {heldout[i]['instruction']}",
                  f"   base : {before['answers'][i]}", f"   tuned: {after['answers'][i]}",
                  f"   (expected: {heldout[i]['output']})"]
    text = "\n".join(lines)
    print(text)

    result = {
        "model": cfg.model, "heldout_questions": len(heldout),
        "base": {k: before[k] for k in ("accuracy", "val_loss")},
        "tuned": {k: after[k] for k in ("accuracy", "val_loss")},
        "train_seconds": summary.result.seconds, "total_seconds": total,
        "steps": summary.result.steps, "trainable_params": summary.trainable_params,
        "samples": [{"question": r["instruction"], "expected": r["output"], "base": b, "tuned": a}
                    for r, b, a in zip(heldout, before["answers"], after["answers"], strict=True)],
    }
    (out / "demo_results.json").write_text(json.dumps(result, indent=2))
    with (out / "report.md").open("a") as f:
        f.write("\n## Demo: before / after\n\n```\n" + text + "\n```\n")
    return result


def _sample_indices(after_hits: list[bool], before_hits: list[bool]) -> list[int]:
    """Two questions worth showing: ones the tuned model gets right and the base does not."""
    fixed = [i for i, (a, b) in enumerate(zip(after_hits, before_hits, strict=True)) if a and not b]
    rest = [i for i in range(len(after_hits)) if i not in fixed]
    return (fixed + rest)[:2]
