"""The task contract: what a batch is, how its loss is computed, and what else a task may do.

A task is a plug-in like a method: a :class:`TaskSpec` (name, config section, builder)
registered in :data:`peftlab.plugins.TASKS`. The builder runs before the model is loaded,
so it can choose the model kind and head from the data (e.g. a classifier's label count).
The Trainer only calls :class:`Task` methods and never branches on a task's name; the
recipe calls the optional hooks, whose defaults do nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import RunConfig
from peftlab.plugins import TASKS
from peftlab.runtime.result import TrainResult


class Task:
    """Base class of every task.

    The training contract (``length``, ``collate``, ``count``, ``loss``) is what the Trainer
    calls; a task with its own loop (``own_loop = True``, e.g. PPO) implements ``fit``
    instead. ``loss`` returns a *sum* and the number of items summed over, so the Trainer can
    normalise exactly across gradient-accumulation micro-batches of unequal sizes.
    """

    peft_task_type: str | None = "CAUSAL_LM"  # written into adapter_config.json
    own_loop: bool = False  # True: the recipe calls fit() instead of running the Trainer
    # True: the task measures eval.forgetting_corpus itself (in baseline and final_report),
    # so the recipe's generic before/after evaluation leaves it out.
    measures_forgetting: bool = False

    # -- the training contract ---------------------------------------------------------
    def length(self, example: dict[str, Any]) -> int:
        """Tokens in one example (for length-grouped batching and throughput)."""
        raise NotImplementedError

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Turn a list of examples into one batch of tensors."""
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> int:
        """How many items ``loss`` will sum over for this batch (known before the forward)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch and the number of items it is summed over."""
        raise NotImplementedError

    def split_rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """``batch`` as smaller batches whose (sum, count) losses add up to its own, or
        ``[batch]`` (the default: rows may depend on each other, e.g. preference pairs). The
        Trainer runs the eager steps that ``train.compile: auto`` times this way, so they do
        not set the run's peak memory above what the compiled steps need."""
        return [batch]

    # -- optional hooks ------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """After the method is applied, before training (e.g. make a new head trainable)."""

    def baseline(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                 precision: str) -> None:
        """Measure the starting model (after ``init_from``, before the method is applied),
        e.g. the held-out perplexity :meth:`final_report` compares with. The recipe restores
        the torch RNG afterwards, so measuring does not change the training run."""

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        """What :meth:`metrics` returns for ``examples``, known before any model runs (so
        ``train.best_metric`` is checked before training starts)."""
        return []

    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Validation metrics beyond the loss; the Trainer logs them as ``val_<name>``."""
        return {}

    def validate(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                 precision: str) -> tuple[float, dict[str, float]] | None:
        """(mean validation loss, :meth:`metrics`) from one pass over ``examples``, for a task
        whose metrics read the same forward as its loss. None (the default): the Trainer runs
        the loss pass and then :meth:`metrics`."""
        return None

    def calibrate(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                  precision: str) -> None:
        """After training, before saving: fit what is chosen on the validation set rather
        than learned by gradient (e.g. a decision threshold); :meth:`save` then writes it."""

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write what the task owns next to the adapter (e.g. a head, labels.json)."""

    def restore(self, model: nn.Module, directory: Path) -> None:
        """Read back what :meth:`save` wrote into a model that has the adapter loaded."""

    def final_report(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                     precision: str) -> dict[str, Any] | None:
        """A report on the validation set after training (written to eval_<task>.json)."""
        return None

    def report_lines(self, report: dict[str, Any]) -> list[str]:
        """Markdown lines for report.md from :meth:`final_report`'s result."""
        return []

    def fit(self, model: nn.Module, tokenizer: Any, train: list[dict[str, Any]],
            validation: list[dict[str, Any]], cfg: RunConfig, output_dir: Path,
            resume: bool | str = False, progress: bool = True) -> TrainResult:
        """The task's own training loop (only when ``own_loop`` is True)."""
        raise NotImplementedError(f"{type(self).__name__} has no training loop of its own")


def halve_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Two batches of the first and second half of the rows, for a task whose rows are
    independent; ``[batch]`` unless every value is a tensor with the same >= 2 rows."""
    rows = {v.shape[0] if isinstance(v, torch.Tensor) and v.dim() else None
            for v in batch.values()}
    if len(rows) != 1 or None in rows or (n := rows.pop()) < 2:
        return [batch]
    half = (n + 1) // 2
    return [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]


@dataclass
class PreparedTask:
    """A built task with its prepared examples, data report and the model it needs."""

    task: Task
    train: list[dict]
    validation: list[dict]
    report: dict[str, Any]
    model_kind: str = "causal_lm"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: ``build(cfg, tokenizer)`` prepares it; ``config_cls`` (optional)
    is the dataclass of its own config section, named after the task."""

    name: str
    build: Callable[[RunConfig, Any], PreparedTask]
    config_cls: type | None = None


def register_task(spec: TaskSpec) -> TaskSpec:
    return TASKS.register(spec.name, spec)


def task_names() -> list[str]:
    return TASKS.names()


def build_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """The run's task object plus its prepared train/validation examples and data report."""
    return TASKS.get(cfg.task).build(cfg, tokenizer)
