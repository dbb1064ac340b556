"""Evaluation around an SFT run: forgetting and generation quality, base vs tuned.

* Forgetting (``eval.forgetting_corpus``): perplexity on the first ``forgetting_max_tokens``
  tokens of a general text file (peftlab.evaluation.perplexity), once on the base model and
  once on the tuned one. "Before" is measured before the method is applied, which for
  switchable methods (LoRA, IA3, adapters) equals the tuned model with its adapter off and
  also works for methods that can't be switched off (full fine-tuning, prompt tuning).
* Generation (``eval.generate``): greedy answers to the prompts of the validation examples
  (the first ``generate_max_rows``; round-robin over the sources of a ``data.mixture``),
  scored against the labelled answers with ROUGE-1/2/L, exact match and BLEU
  (peftlab.evaluation.text_metrics). ``eval.compare_base`` does the same on the base model
  first. Writes ``predictions.jsonl`` and ``generation_metrics.json``.

Both base and tuned passes run under the run's precision (bf16 autocast or fp32) so the
comparison is not confounded by precision. The before-training pass leaves the torch RNG
as it found it, so switching evaluation on doesn't change the adapter's initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import ConfigError, RunConfig
from peftlab.evaluation.perplexity import compare_forgetting, forgetting_report
from peftlab.evaluation.text_metrics import generation_report, text_metrics
from peftlab.runtime.distributed import World
from peftlab.runtime.precision import autocast_for

METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "bleu")
FORGETTING_TASKS = ("sft", "pretrain")  # pretrain measures it itself (Task.measures_forgetting)


def check_eval_config(cfg: RunConfig) -> None:
    """Fail before any work if the evaluation can't run (errors name the key)."""
    e = cfg.eval
    for key, on, tasks in (("forgetting_corpus", e.forgetting_corpus is not None,
                            FORGETTING_TASKS), ("generate", e.generate, ("sft",))):
        if on and cfg.task not in tasks:
            raise ConfigError(f"eval.{key}: only runs for task: {' or '.join(tasks)} (this run "
                              f"is task: {cfg.task})")
    if e.forgetting_corpus is not None and not Path(e.forgetting_corpus).is_file():
        raise ConfigError(f"eval.forgetting_corpus: file not found: {e.forgetting_corpus}")


def measure_forgetting(model: nn.Module, tokenizer: Any, cfg: RunConfig,
                       precision: str) -> dict[str, Any]:
    """Perplexity of ``model`` on ``eval.forgetting_corpus`` with the run's settings."""
    e = cfg.eval
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and e.forgetting_window > limit:
        raise ConfigError(f"eval.forgetting_window: {e.forgetting_window} is longer than the "
                          f"model's context ({limit} tokens)")
    return forgetting_report(model, tokenizer, e.forgetting_corpus,
                             max_tokens=e.forgetting_max_tokens, window=e.forgetting_window,
                             stride=e.forgetting_stride or max(1, e.forgetting_window // 2),
                             batch_size=e.batch_size, precision=precision)


def forgetting_summary(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """:func:`compare_forgetting` plus the absolute ``delta`` and the ``ratio`` after/before."""
    out = compare_forgetting(before, after)
    out.update(delta=after["perplexity"] - before["perplexity"],
               ratio=after["perplexity"] / before["perplexity"],
               nll_before=before["nll"], nll_after=after["nll"], window=before["window"],
               stride=before["stride"], max_tokens=before["max_tokens"])
    return out


def describe_forgetting(f: dict[str, Any]) -> str:
    return (f"forgetting ({f['corpus']}, {f['tokens']} tokens): perplexity "
            f"{f['perplexity_before']:.3f} -> {f['perplexity_after']:.3f} "
            f"({100 * f['relative_change']:+.2f}%)")


def generation_examples(examples: list[dict[str, Any]],
                        max_rows: int | None) -> list[dict[str, Any]]:
    """The first ``max_rows`` examples; with sources, taken round-robin over them."""
    if max_rows is None or len(examples) <= max_rows:
        return list(examples)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for ex in examples:
        groups.setdefault(ex.get("source"), []).append(ex)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < max_rows:
        picked += [g[depth] for g in groups.values() if depth < len(g)][:max_rows - len(picked)]
        depth += 1
    return picked


def generate(model: nn.Module, tokenizer: Any, examples: list[dict[str, Any]], cfg: RunConfig,
             precision: str, world: World | None = None) -> dict[str, Any] | None:
    """:func:`generation_report` with every sample kept (one per example, in order); sharded
    over the ranks of ``world`` (None on ranks other than 0)."""
    with autocast_for(precision):
        return generation_report(model, tokenizer, examples, max_new_tokens=cfg.eval.max_new_tokens,
                                 batch_size=cfg.eval.batch_size, samples=None, world=world)


def write_generation(out_dir: Path | None, examples: list[dict[str, Any]],
                     runs: dict[str, dict[str, Any]], prefix: str = "") -> dict[str, Any]:
    """Write ``{prefix}predictions.jsonl`` and ``{prefix}generation_metrics.json`` (unless
    ``out_dir`` is None).

    ``runs`` maps "base"/"tuned" to :func:`generate` reports of the same ``examples``.
    Returns the metrics: ``examples``, ``<run>: {rouge1, rouge2, rougeL, exact_match, bleu}``
    and, for mixtures, ``by_source: {name: {<run>: {...}}}``.
    """
    first = next(iter(runs.values()))
    rows = []
    for i, sample in enumerate(first["samples"]):
        row = {"prompt": sample["prompt"], "reference": sample["reference"]}
        for run, report in runs.items():
            row["prediction" if run == "tuned" else f"{run}_prediction"] = (
                report["samples"][i]["prediction"])
        if "source" in examples[i]:
            row["source"] = examples[i]["source"]
        rows.append(row)
    metrics: dict[str, Any] = {"examples": len(rows)}
    for run, report in runs.items():
        metrics[run] = {k: report[k] for k in METRICS}
    sources = sorted({r["source"] for r in rows if "source" in r})
    if sources:
        metrics["by_source"] = {}
        for name in sources:
            idx = [i for i, r in enumerate(rows) if r.get("source") == name]
            refs = [rows[i]["reference"] for i in idx]
            metrics["by_source"][name] = {
                run: text_metrics([report["samples"][i]["prediction"] for i in idx], refs)
                for run, report in runs.items()}
    if out_dir is None:
        return metrics
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{prefix}predictions.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / f"{prefix}generation_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def generation_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown: one row per metric, one column per run (base, tuned)."""
    runs = [r for r in ("base", "tuned") if r in metrics]
    lines = ["| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {k} | " + " | ".join(f"{metrics[r][k]:.4f}" for r in runs) + " |"
              for k in METRICS]
    return lines


class RunEvaluation:
    """The evaluation of one training run: :meth:`before` on the base model (before the
    method is applied), :meth:`after` on the trained model.

    Under torchrun every rank calls both: the generation is sharded over the ranks (rank 0
    gathers, scores and writes); the forgetting perplexity runs on rank 0 alone."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, validation: list[dict[str, Any]],
                 forgetting: bool = True, world: World | None = None):
        """``forgetting=False``: leave ``eval.forgetting_corpus`` to the task."""
        check_eval_config(cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.world = world or World()
        self.forgetting = forgetting and cfg.eval.forgetting_corpus is not None
        self.examples: list[dict[str, Any]] = []
        if cfg.eval.generate:
            if not validation:
                raise ConfigError("eval.generate needs validation examples: set data.validation "
                                  "or data.validation_split")
            self.examples = generation_examples(validation, cfg.eval.generate_max_rows)
        self.base_forgetting: dict[str, Any] | None = None
        self.base_generation: dict[str, Any] | None = None

    @property
    def enabled(self) -> bool:
        return self.forgetting or self.cfg.eval.generate

    def before(self, model: nn.Module) -> None:
        cfg, precision = self.cfg, self.cfg.train.precision
        rng = torch.get_rng_state()
        try:
            if self.forgetting and self.world.main:
                self.base_forgetting = measure_forgetting(model, self.tokenizer, cfg, precision)
                print(f"forgetting corpus: base perplexity "
                      f"{self.base_forgetting['perplexity']:.3f} over "
                      f"{self.base_forgetting['tokens']} tokens")
            if cfg.eval.compare_base:
                self.base_generation = generate(model, self.tokenizer, self.examples, cfg,
                                                precision, self.world)
        finally:
            torch.set_rng_state(rng)

    def after(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        """Measure the tuned model; write the files; return ``{forgetting?, generation?}``."""
        cfg, precision = self.cfg, self.cfg.train.precision
        result: dict[str, Any] = {}
        if not self.world.main:  # this rank's share of the answers; rank 0 writes
            if cfg.eval.generate:
                generate(model, self.tokenizer, self.examples, cfg, precision, self.world)
            return result
        if self.base_forgetting is not None:
            after = measure_forgetting(model, self.tokenizer, cfg, precision)
            result["forgetting"] = forgetting_summary(self.base_forgetting, after)
            print(describe_forgetting(result["forgetting"]))
        if cfg.eval.generate:
            runs = {"tuned": generate(model, self.tokenizer, self.examples, cfg, precision,
                                      self.world)}
            if self.base_generation is not None:
                runs = {"base": self.base_generation, **runs}
            result["generation"] = write_generation(out_dir, self.examples, runs)
            print(f"generation on {len(self.examples)} validation prompts:")
            print("\n".join(generation_table(result["generation"])))
        if result:
            (out_dir / f"eval_{cfg.task}.json").write_text(json.dumps(result, indent=2))
        return result


def report_lines(evaluation: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """Markdown sections of the run report: per-source validation, forgetting, generation."""
    lines: list[str] = []
    last = next((r for r in reversed(history) if any(k.startswith("val_loss/") for k in r)), None)
    if last is not None:
        names = sorted(k[len("val_loss/"):] for k in last if k.startswith("val_loss/"))
        lines += [f"## validation per source (step {last['step']})", "",
                  "| source | val_loss | val_ppl |", "|---|---|---|"]
        lines += [f"| {n} | {last[f'val_loss/{n}']:.4f} | {last.get(f'val_ppl/{n}', float('nan')):.3f} |"
                  for n in names]
        lines += ["| all | " + f"{last['val_loss']:.4f} | {last.get('val_ppl', float('nan')):.3f} |",
                  ""]
    f = evaluation.get("forgetting")
    if f:
        lines += ["## forgetting", "", "| corpus | tokens | perplexity before | perplexity after "
                  "| change |", "|---|---|---|---|---|",
                  f"| {f['corpus']} | {f['tokens']} | {f['perplexity_before']:.3f} | "
                  f"{f['perplexity_after']:.3f} | {100 * f['relative_change']:+.2f}% |", ""]
    g = evaluation.get("generation")
    if g:
        lines += [f"## generation ({g['examples']} validation prompts, greedy)", "",
                  *generation_table(g), "", "predictions: predictions.jsonl", ""]
    return lines
