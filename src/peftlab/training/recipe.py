"""The fine-tuning recipe: config in, trained and saved adapter out.

load model -> apply method -> prepare data through the task -> Trainer.fit -> save
adapter + tokenizer (peft format) -> loss curve, data report, run report.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.config import ConfigError, RunConfig
from peftlab.evaluation.sft_eval import RunEvaluation, check_eval_config, report_lines
from peftlab.files import write_text_atomic
from peftlab.methods import Method, get_method, optimizer_param_groups
from peftlab.methods.chain import init_chain, merge_chain, write_chain
from peftlab.models import load_model, load_tokenizer
from peftlab.runtime.device import move_model
from peftlab.runtime.distributed import World, init_world
from peftlab.runtime.plots import plot_loss_curve
from peftlab.runtime.precision import prepare_precision, resolve_precision
from peftlab.runtime.result import TrainResult
from peftlab.runtime.tracking import check_trackers, write_trackers
from peftlab.tasks import Task, build_task
from peftlab.training.run_dir import (
    check_output_dir,
    clear_earlier_run,
    error_line,
    write_status,
)
from peftlab.training.trainer import EvalHook, Trainer, check_best_metric


@dataclass
class RunSummary:
    output_dir: Path
    adapter_dir: Path
    result: TrainResult
    trainable_params: int
    total_params: int
    data_report: dict[str, Any]
    evaluation: dict[str, Any] = field(default_factory=dict)  # forgetting, generation (sft)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def run_training(cfg: RunConfig, resume: bool | str = False, progress: bool = True,
                 model=None, tokenizer=None, overwrite: bool = False,
                 on_evaluate: EvalHook | None = None) -> RunSummary:
    """Run one fine-tuning job end to end. ``model``/``tokenizer`` may be passed pre-loaded.
    ``on_evaluate`` goes to the Trainer (a task with its own loop, e.g. PPO, never calls it).

    Everything that can fail on bad input (config, data, model, the adapter's save, the
    output directory) is checked before ``output_dir`` is touched. An earlier run there is
    continued only with ``resume`` and replaced only with ``overwrite``.

    Under ``torchrun`` (WORLD_SIZE > 1) the ranks train data-parallel
    (peftlab.runtime.distributed); rank 0 alone writes and prints, and only its summary
    describes saved files.
    """
    world = init_world(cfg.train.device)
    if world.main:
        return _run(cfg, resume, progress, model, tokenizer, world, overwrite, on_evaluate)
    with contextlib.redirect_stdout(io.StringIO()):
        return _run(cfg, resume, False, model, tokenizer, world, overwrite, on_evaluate)


def _run(cfg: RunConfig, resume: bool | str, progress: bool, model, tokenizer,
         world: World, overwrite: bool, on_evaluate: EvalHook | None) -> RunSummary:
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    # -- 1. check everything; nothing is written until the end of this block ----------
    if world.main:
        check_output_dir(out, resume, overwrite)
    check_eval_config(cfg)  # e.g. a missing eval.forgetting_corpus fails before any work
    check_trackers(cfg.train.report_to)
    if cfg.train.num_threads:  # before measuring: auto precision times matmuls on these threads
        torch.set_num_threads(cfg.train.num_threads)
    precision = world.choose(["fp32", "bf16"], resolve_precision(cfg.train.precision))
    if precision != cfg.train.precision:
        print(f"precision auto -> {precision} (measured matmul rates on this machine)")
        cfg.train.precision = precision
    torch.manual_seed(cfg.train.seed)

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    prepared = build_task(cfg, tokenizer)
    task, train, val, data_report = (prepared.task, prepared.train, prepared.validation,
                                     prepared.report)
    if task.own_loop:  # e.g. task: ppo
        for key in ("activation_checkpointing", "compile", "neftune_alpha"):
            if getattr(cfg.train, key) not in (None, False, "auto"):
                raise ConfigError(f"train.{key} is not supported by task {cfg.task!r} (it runs "
                                  "its own loop); set it to false")
        if world.size > 1:
            raise ConfigError(f"task {cfg.task!r} runs its own loop, which does not support "
                              "torch.distributed yet; run it in one process")
        if world.device.type != "cpu":
            raise ConfigError(f"train.device: task {cfg.task!r} runs its own loop, which keeps "
                              f"its tensors on the CPU (got {world.device}); set it to cpu")
    else:
        check_best_metric(cfg.train.best_metric, task, val)
    chain = init_chain(cfg.init_from, cfg.model) if cfg.init_from else []
    if model is None:
        model, _ = load_model(cfg.model, kind=prepared.model_kind, **prepared.model_kwargs)
    if chain:  # start from the earlier run's adapted weights
        merge_chain(model, chain)
        print(f"init_from: merged {len(chain)} earlier adapter(s) into the base weights: "
              + ", ".join(str(d) for d in chain))
    _print_data_report(data_report)

    evaluation = RunEvaluation(cfg, tokenizer, val, forgetting=not task.measures_forgetting,
                               world=world)
    model = move_model(model, world.device)
    if world.main:  # on the starting model, before the method is applied
        rng = torch.get_rng_state()
        try:
            task.baseline(model, val, cfg.eval.batch_size, cfg.train.precision)
        finally:
            torch.set_rng_state(rng)
    if evaluation.enabled:  # every rank: the generation is sharded over them
        evaluation.before(model)

    method = get_method(cfg.method_name)
    method.apply(model, cfg.method, "default")
    task.prepare_model(model)  # e.g. train a new classifier head
    trainable, total = count_parameters(model)
    print(f"method {cfg.method_name}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.3f}%)")
    prepare_precision(model, cfg.train.precision)
    model = move_model(model, world.device)  # the method's and the task's new parameters too
    if world.main:  # whatever would make the final save fail must fail now, not after training
        preflight_save(lambda directory: _save_adapter(cfg, method, task, model, tokenizer,
                                                       directory, chain), out)
    trainer = None
    if not task.own_loop:  # with train.distributed: fsdp it shards the model
        trainer = Trainer(model, task, train, val, cfg.train, out, progress=progress,
                          world=world, on_evaluate=on_evaluate,
                          param_groups=optimizer_param_groups(model, method, cfg.method))
        if cfg.train.compile == "auto" and world.main:
            print(f"compile auto -> {trainer.compile_reason}")

    # -- 2. the run writes from here on ---------------------------------------------------
    if world.main:
        if overwrite:
            clear_earlier_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", cfg.to_yaml())
        write_text_atomic(out / "data_report.json", json.dumps(data_report, indent=2))
        write_status(out, "running", started=time.time())
    try:
        summary = _train_and_save(cfg, resume, progress, model, tokenizer, world, task, train,
                                  val, data_report, trainer, method, chain, evaluation,
                                  trainable, total, started)
    except BaseException as exc:
        if world.main:
            stopped = isinstance(exc, KeyboardInterrupt)
            write_status(out, "stopped" if stopped else "failed",
                         error="interrupted" if stopped else error_line(exc))
        raise
    if world.main:
        write_status(out, "finished", steps=summary.result.steps)
    return summary


def _train_and_save(cfg: RunConfig, resume: bool | str, progress: bool, model, tokenizer,
                    world: World, task: Task, train, val, data_report: dict[str, Any],
                    trainer: Trainer | None, method: Method, chain: list[Path],
                    evaluation: RunEvaluation, trainable: int, total: int,
                    started: float) -> RunSummary:
    """Step 2 of a run, once everything is checked: train, save, evaluate, report."""
    out = Path(cfg.output_dir)
    if trainer is None:
        result = task.fit(model, tokenizer, train, val, cfg, out, resume=resume, progress=progress)
    else:
        result = trainer.fit(resume=resume)
        model = trainer.model  # fsdp: a plain model with the gathered full weights

    adapter_dir = out / "adapter"
    if not world.main:  # the same weights as rank 0, which saves them
        if evaluation.enabled:  # its share of the generation
            evaluation.after(model, out)
        return RunSummary(out, adapter_dir, result, trainable, total, data_report)
    if val:
        task.calibrate(model, val, cfg.eval.batch_size, cfg.train.precision)
    _save_adapter(cfg, method, task, model, tokenizer, adapter_dir, chain)
    report = (task.final_report(model, val, cfg.eval.batch_size, cfg.train.precision)
              if val or task.measures_forgetting else None)
    if report is not None:  # e.g. per-class scores and the confusion matrix
        (out / f"eval_{cfg.task}.json").write_text(json.dumps(report, indent=2))
    evaluated = evaluation.after(model, out) if evaluation.enabled else {}
    if result.history:
        plot_loss_curve(result.history, out / "loss.png", title=f"{cfg.method_name} on {cfg.model}")
    if cfg.train.report_to:
        write_trackers(cfg.train.report_to, out, cfg.to_dict(), result.history, adapter_dir,
                       run_name=out.name)
    summary = RunSummary(out, adapter_dir, result, trainable, total, data_report, evaluated)
    _write_report(cfg, summary, time.perf_counter() - started,
                  task.report_lines(report) if report is not None else [])
    print(f"saved adapter to {adapter_dir}")
    return summary


def _save_adapter(cfg: RunConfig, method: Method, task: Task, model: torch.nn.Module,
                  tokenizer: Any, directory: Path, chain: list[Path]) -> None:
    """The adapter (peft format), the tokenizer, the task's extras (e.g. labels.json) and,
    for a chained run, the adapters it starts from (init_from.json)."""
    method.save(model, directory, adapter_name="default", base_model_name_or_path=cfg.model,
                task_type=task.peft_task_type)
    tokenizer.save_pretrained(directory)
    task.save(model, directory)
    write_chain(directory, chain)


def preflight_save(save: Callable[[Path], None], out: Path) -> None:
    """Run ``save`` once into a throw-away directory beside ``out``: a save that cannot work
    (tensors that share memory, a target inside a fully trained module, a full disk or a
    read-only folder) then fails before training, not after hours of it."""
    parent = next(p for p in (out.parent, *out.parents) if p.exists())
    with tempfile.TemporaryDirectory(dir=parent, prefix=".peftlab-preflight-") as tmp:
        try:
            save(Path(tmp) / "adapter")
        except (ConfigError, OSError) as exc:
            raise ConfigError(f"the adapter could not be saved after training: {exc}") from exc
        except RuntimeError as exc:  # safetensors: "Some tensors share memory ..."
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"the adapter could not be saved after training: {first}") from exc


def _print_data_report(report: dict[str, Any]) -> None:
    for split in ("train", "validation"):
        s = report.get(split) or {}
        if not s.get("rows") and not s.get("kept"):
            if split == "validation":
                print("data validation: none (no validation during training; set "
                      "data.validation or data.validation_split)")
            continue
        if s:
            print(f"data {split}: {s.get('kept', 0)} examples kept of {s.get('rows', 0)} "
                  f"(dropped {s.get('dropped_too_long', 0)} over max_length, "
                  f"{s.get('dropped_no_target', 0)} without target tokens, "
                  f"{s.get('dropped_invalid', 0)} invalid)")
        if s.get("truncated"):
            print(f"data {split}: {s['truncated']} examples truncated to max_length")
        if s.get("class_counts"):
            print(f"data {split}: class counts {s['class_counts']}")
    for key in ("train_file", "validation_file"):
        f = report.get(key) or {}
        if f.get("rows_skipped"):
            print(f"data {f['path']}: skipped {f['rows_skipped']} bad rows, e.g. {f['skipped'][:1]}")


def _write_report(cfg: RunConfig, s: RunSummary, seconds: float,
                  task_lines: list[str]) -> None:
    r = s.result
    lines = [
        f"# peftlab run: {cfg.method_name} on {cfg.model}", "",
        "| what | value |", "|---|---|",
        f"| task | {cfg.task} |",
        *([f"| started from | {cfg.init_from} (init_from) |"] if cfg.init_from else []),
        f"| trainable parameters | {s.trainable_params:,} of {s.total_params:,} "
        f"({100 * s.trainable_params / s.total_params:.3f}%) |",
        f"| training examples | {s.data_report.get('train', {}).get('kept', '?')} |",
        f"| validation examples | {s.data_report.get('validation', {}).get('kept', '?')} |",
        f"| optimizer steps | {r.steps} |",
        f"| final train loss | {r.final_train_loss if r.final_train_loss is None else round(r.final_train_loss, 4)} |",
        f"| best {r.best_metric} | {r.best_value if r.best_value is None else round(r.best_value, 4)} (step {r.best_step}) |",
        f"| training time | {r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s) |",
        f"| wall time | {seconds:.1f} s |",
        "", "![loss curve](loss.png)", "",
        *task_lines,
        *report_lines(s.evaluation, r.history),
    ]
    (s.output_dir / "report.md").write_text("\n".join(lines))
