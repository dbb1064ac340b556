"""The Python API; it mirrors the CLI one function per command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peftlab.config import RunConfig, from_dict, load_config
from peftlab.data.hf_datasets import resolve_data_objects
from peftlab.evaluation import sft_eval
from peftlab.evaluation.loss import evaluate_loss, perplexity
from peftlab.export.gguf import DTYPES, export_gguf
from peftlab.export.gguf_lora import export_gguf_lora
from peftlab.files import check_can_write, write_text_atomic
from peftlab.lab.baseline import BaselineResult, run_baseline
from peftlab.lab.search_space import apply_settings, load_space, space_from_dict
from peftlab.lab.study import run_study
from peftlab.lab.sweep import parse_grid, run_sweep
from peftlab.methods import get_method, method_for_adapter_dir, method_names, methods_on
from peftlab.methods.chain import init_chain, load_adapter, merge_chain
from peftlab.methods.lora_merge import merge_lora_adapters, save_merged
from peftlab.models import load_model, load_tokenizer
from peftlab.runtime.precision import resolve_precision
from peftlab.tasks import build_task
from peftlab.tasks.classification.predict import predict_file
from peftlab.training.recipe import run_training


def _as_config(config: RunConfig | dict | str | Path, overrides: list[str] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return load_config(overrides=overrides, base=config.to_dict())
        return config
    if isinstance(config, dict):
        if isinstance(config.get("data"), dict):  # datasets.Dataset objects in place of paths
            config = dict(config, data=resolve_data_objects(config["data"]))
        return load_config(overrides=overrides, base=config) if overrides else from_dict(config)
    return load_config(config, overrides)


def train(config: RunConfig | dict | str | Path, overrides: list[str] | None = None,
          resume: bool | str = False, progress: bool = True, overwrite: bool = False):
    """Fine-tune as the config says; returns a RunSummary (adapter saved in output_dir).

    An earlier run in output_dir is continued with ``resume`` (True: its newest good
    checkpoint, or a checkpoint path) or replaced with ``overwrite``; otherwise it is an
    error, raised before anything is written."""

    return run_training(_as_config(config, overrides), resume=resume, progress=progress,
                        overwrite=overwrite)


def sweep(config: RunConfig | dict | str | Path, grid: list[str] | dict[str, list] | None = None,
          overrides: list[str] | None = None, trials: int | None = None, seed: int | None = None,
          progress: bool = True, space: str | Path | dict | None = None,
          sampler: str | None = None, pruner: str | None = None, timeout: float | None = None,
          workers: int | None = None):
    """Hyper-parameter search / method comparison; returns a SweepResult ranked by
    ``train.best_metric`` (also OUTPUT_DIR/sweep.md, sweep.json, sweep.png).

    ``grid``: train the config once per grid point (``{"train.lr": [1e-4, 3e-4]}`` or
    ``["train.lr=1e-4,3e-4"]``), or a seeded sample of ``trials`` points. ``space`` (a
    SPACE.yaml path or its dict) instead: an Optuna study (``sampler`` tpe|random|grid,
    ``pruner`` median|asha|none, ``trials``/``timeout`` budget, ``workers`` processes) stored
    in OUTPUT_DIR/study.db, resumed when run again. Arguments given here override SPACE.yaml."""

    if (grid is None) == (space is None):
        raise ValueError("sweep: give either a grid (--grid) or a search space (--space)")
    cfg = _as_config(config, overrides)
    if grid is not None:
        for name, value in (("sampler", sampler), ("pruner", pruner), ("timeout", timeout),
                            ("workers", workers)):
            if value is not None:
                raise ValueError(f"sweep: {name} needs a search space (--space), not --grid")
        return run_sweep(cfg, parse_grid(grid), trials=trials, seed=seed or 0,
                         progress=progress)
    parsed = (space_from_dict(space, "space") if isinstance(space, dict) else load_space(space))
    apply_settings(parsed, {"sampler": sampler, "pruner": pruner, "trials": trials,
                            "timeout": timeout, "workers": workers, "seed": seed},
                   "sweep")
    return run_study(cfg, parsed, progress=progress)


def baseline(config: RunConfig | dict | str | Path, overrides: list[str] | None = None,
             folds: int = 5, write: bool = True) -> BaselineResult:
    """The classical bar to beat for ``task: classification``: TF-IDF 1-2-grams + a linear
    SVM or logistic regression chosen by (document-grouped, with ``data.group_field``)
    cross-validation on the training rows, scored on the validation rows; with ``write``
    also OUTPUT_DIR/baseline.json."""

    return run_baseline(_as_config(config, overrides), folds=folds, write=write)


def export(model: str, adapter: str | Path | None = None, gguf: str | Path | None = None,
           hf: str | Path | None = None, dtype: str = "f16",
           tokenizer_pre: str = "default", gguf_adapter: str | Path | None = None) -> dict[str, str]:
    """Fold ``adapter`` (LoRA/IA3) into ``model`` and write it as a GGUF file (``gguf``; dtype
    f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0) and/or a plain transformers directory (``hf``:
    safetensors + tokenizer); and/or write a LoRA ``adapter`` alone as a llama.cpp GGUF
    adapter (``gguf_adapter``, f32; used with a GGUF of the base). Returns the paths written."""

    if gguf is None and hf is None and gguf_adapter is None:
        raise ValueError("export: give a GGUF file path (--gguf), a GGUF adapter path "
                         "(--gguf-adapter) and/or a directory (--hf)")
    if dtype not in DTYPES:  # before the model is loaded
        raise ValueError(f"dtype: {dtype!r} is not one of {list(DTYPES)}")
    if gguf_adapter is not None and adapter is None:
        raise ValueError("--gguf-adapter: give the LoRA adapter to export with --adapter")
    for path, flag in ((gguf, "--gguf"), (gguf_adapter, "--gguf-adapter")):
        if path is not None:
            check_can_write(path, flag)
    if hf is not None:
        check_can_write(hf, "--hf", directory=True)
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter: {adapter}: no such adapter directory")
    base, tokenizer = load(model, adapter=adapter)
    name = Path(str(adapter)).name if adapter is not None else None
    written: dict[str, str] = {}
    if gguf_adapter is not None:  # before merging: the adapter's own matrices
        if method_for_adapter_dir(adapter).name != "lora":
            raise ValueError(f"--gguf-adapter: {adapter} is not a LoRA adapter; llama.cpp "
                             "adapters are LoRA only (use --gguf for the merged model)")
        written["gguf_adapter"] = str(export_gguf_lora(base, gguf_adapter, name=name))
    if gguf is None and hf is None:
        return written
    if adapter is not None:
        base = merge(base)
    if hf is not None:
        base.save_pretrained(str(hf))
        tokenizer.save_pretrained(str(hf))
        written["hf"] = str(hf)
    if gguf is not None:
        written["gguf"] = str(export_gguf(base, tokenizer, gguf, dtype=dtype, name=name,
                                          tokenizer_pre=tokenizer_pre))
    return written


def load(model: str, adapter: str | Path | None = None, kind: str = "causal_lm"):
    """Load a base model (+ a saved adapter, any registered method, after the adapters of
    the runs it was chained on with ``init_from``) and its tokenizer."""

    base, tokenizer = load_model(model, kind=kind)
    if adapter is not None:
        load_adapter(base, adapter)
    base.eval()
    return base, tokenizer


def merge(model):
    """Fold the adapter into the base weights and return a plain transformers model.

    Only methods whose update is a change of the base weights can be folded (those that
    declare ``merge``: LoRA and (IA)^3, both may be present). Bottleneck adapters, prompt
    tuning, p-tuning and prefix tuning add computation no weight can absorb, so they are
    refused before anything is changed.
    """

    name = type(model).__name__
    mergeable = [n for n in method_names() if get_method(n).merge is not None]
    present = methods_on(model)
    for method in present:
        if method.merge is None:
            raise ValueError(f"merge: {name} carries a {method.name} adapter, which cannot be "
                             f"folded into the base weights (only {' and '.join(mergeable)} "
                             "can); keep it as an adapter")
    if not present:
        raise ValueError(f"merge: {name} has no adapter layers to fold (methods that can be "
                         f"folded: {', '.join(mergeable)})")
    for method in present:
        method.merge(model)
    return model


# tokenizer files a training run saves next to its adapter (copied into a merged adapter)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
                    "vocab.txt", "tokenizer.model")


def merge_adapters(adapters: list[str | Path], output: str | Path,
                   weights: list[float] | None = None, combination: str = "linear",
                   density: float | None = None, majority_sign: str = "total",
                   rank: int | None = None, seed: int = 0,
                   overwrite: bool = False) -> dict[str, Any]:
    """Combine LoRA adapters of one base model into one adapter in ``output`` (peft format),
    e.g. a multi-task adapter from single-task ones: ``combination`` linear (weighted sum,
    exact), ties, dare_linear or dare_ties (``density``: share of each update kept; ``seed``:
    DARE's masks), stored at ``rank`` (default: the sum of the input ranks). See
    peftlab.methods.lora_merge. Returns a summary (also written to ``output``/merge.json)."""

    out = Path(output)
    if any(out.resolve() == Path(a).resolve() for a in adapters):
        raise ValueError(f"--output: {out} is one of the adapters being merged")
    check_can_write(out, "--output", directory=True)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--output: {out} exists and is not empty (--overwrite replaces its "
                         "adapter files)")
    merged = merge_lora_adapters(adapters, weights, combination, density, majority_sign, rank,
                                 seed)
    save_merged(merged, out)
    tokenizer_from = Path(adapters[0])
    for name in _TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, out / name)
    errors = list(merged.errors.values())
    summary = {
        "output": str(out), "adapters": [str(a) for a in adapters],
        "weights": merged.weights, "combination": combination, "density": density,
        "majority_sign": majority_sign if combination in ("ties", "dare_ties") else None,
        "seed": seed if combination.startswith("dare") else None, "rank": merged.rank,
        "modules": len(errors), "max_relative_error": round(max(errors), 6),
        "mean_relative_error": round(sum(errors) / len(errors), 6),
    }
    write_text_atomic(out / "merge.json", json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate(config: RunConfig | dict | str | Path, overrides: list[str] | None = None,
             adapter: str | Path | None = None) -> dict[str, Any]:
    """Validation loss and perplexity of the base model and of the run's adapter, plus the
    adapter's task report where the task has one (classification: per-class scores at the
    saved decision threshold).

    With ``init_from`` the "base" is the run's starting point (the earlier adapters merged).
    For ``task: sft`` and ``pretrain`` also, as configured: forgetting
    (``eval.forgetting_corpus``: perplexity of base and adapter, compared); for ``sft``
    generation (``eval.generate``: the adapter's answers,
    plus the base model's with ``eval.compare_base`` or when there is no adapter; written to
    OUTPUT_DIR/eval_predictions.jsonl and eval_generation_metrics.json).
    """

    cfg = _as_config(config, overrides)
    sft_eval.check_eval_config(cfg)
    tokenizer = load_tokenizer(cfg.model)
    prepared = build_task(cfg, tokenizer)
    task, val = prepared.task, prepared.validation
    if not val:
        raise ValueError("eval needs validation data: set data.validation or data.validation_split")
    chain = init_chain(cfg.init_from, cfg.model) if cfg.init_from else []
    model, _ = load_model(cfg.model, kind=prepared.model_kind, **prepared.model_kwargs)
    merge_chain(model, chain)  # "base" is the run's starting point

    bs, prec = cfg.eval.batch_size, resolve_precision(cfg.train.precision)
    results: dict[str, Any] = {"examples": len(val)}
    base_loss = evaluate_loss(model, task, val, bs, prec)
    results["base"] = {"val_loss": base_loss, "perplexity": perplexity(base_loss)}
    adapter_dir = Path(adapter) if adapter else Path(cfg.output_dir) / "adapter"
    if adapter and not adapter_dir.is_dir():  # not silently the base model's numbers
        raise FileNotFoundError(f"--adapter: {adapter}: no such adapter directory")
    # A task that measures forgetting itself (pretrain: MLM loss for encoders) does it in its
    # before/after hooks, here without the validation set (its loss is computed above).
    own_forgetting = task.measures_forgetting
    forgetting = cfg.eval.forgetting_corpus is not None and not own_forgetting
    gen_examples = sft_eval.generation_examples(val, cfg.eval.generate_max_rows)
    runs: dict[str, Any] = {}
    if own_forgetting:
        task.baseline(model, [], bs, prec)
    if forgetting:
        results["base"]["forgetting"] = sft_eval.measure_forgetting(model, tokenizer, cfg, prec)
    if cfg.eval.generate and (cfg.eval.compare_base or not adapter_dir.is_dir()):
        runs["base"] = sft_eval.generate(model, tokenizer, gen_examples, cfg, prec)
    if adapter_dir.is_dir():
        if chain:  # already merged above
            method_for_adapter_dir(adapter_dir).load(model, adapter_dir, adapter_name="default")
        else:
            load_adapter(model, adapter_dir)
        task.restore(model, adapter_dir)  # e.g. a classifier head the task saved
        loss = evaluate_loss(model, task, val, bs, prec)
        results["adapter"] = {"path": str(adapter_dir), "val_loss": loss,
                              "perplexity": perplexity(loss)}
        report = task.final_report(model, val, bs, prec)  # e.g. at the saved threshold
        if report is not None:
            results["adapter"]["report"] = report
        if forgetting:
            after = sft_eval.measure_forgetting(model, tokenizer, cfg, prec)
            results["adapter"]["forgetting"] = after
            results["forgetting"] = sft_eval.forgetting_summary(results["base"]["forgetting"],
                                                                after)
        if own_forgetting:
            report = task.final_report(model, [], bs, prec) or {}
            if report.get("forgetting"):
                results["forgetting"] = report["forgetting"]
        if cfg.eval.generate:
            runs["tuned"] = sft_eval.generate(model, tokenizer, gen_examples, cfg, prec)
    out = Path(cfg.output_dir)
    if runs:
        results["generation"] = sft_eval.write_generation(out if out.is_dir() else None,
                                                          gen_examples, runs, prefix="eval_")
    if out.is_dir():
        (out / "eval.json").write_text(json.dumps(results, indent=2))
    return results


def predict(adapter: str | Path, input: str | Path | list, model: str | None = None,
            output: str | Path | None = None, text_field: str | None = None,
            text_pair_field: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Classify every row of ``input`` (a JSONL/CSV/TSV/... file, or a list of texts or row
    dicts) with a classifier trained by ``task: classification``.

    ``model`` defaults to the adapter's base model; text fields default to the training ones
    (from the adapter's labels.json). Returns ``{"predictions": [{"row", "prediction",
    "probabilities"[, "gold"]}], "rows", "labelled", "accuracy", "truncated", "output"}``;
    ``output`` also gets one JSON line per input row.
    """

    return predict_file(input, adapter, model=model, output=output, text_field=text_field,
                        text_pair_field=text_pair_field, batch_size=batch_size)
