"""Tasks: what a batch is, how its loss and metrics are computed, how its data is prepared.

Each task registers a builder ``(cfg, tokenizer) -> PreparedTask``. The builder runs
before the model is loaded, so a task can decide the model kind and head (for example
the number of labels of a classifier) from its data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftlab.tasks.base import Task


@dataclass
class PreparedTask:
    task: Task
    train: list[dict]
    validation: list[dict]
    report: dict[str, Any]
    model_kind: str = "causal_lm"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


_BUILDERS: dict[str, Callable[..., PreparedTask]] = {}


def register_task(name: str, builder: Callable[..., PreparedTask]) -> None:
    _BUILDERS[name] = builder


def task_names() -> list[str]:
    _load_builtin()
    return sorted(_BUILDERS)


def build_task(cfg, tokenizer) -> PreparedTask:
    """The run's task object plus its prepared train/validation examples and data report."""
    _load_builtin()
    if cfg.task not in _BUILDERS:
        raise ValueError(f"task: {cfg.task!r} is not implemented (known: {task_names()})")
    return _BUILDERS[cfg.task](cfg, tokenizer)


def _load_builtin() -> None:
    from peftlab.tasks import classification, dpo, reward, sft  # noqa: F401  (register themselves)
    from peftlab.train import ppo  # noqa: F401  (registers "ppo": its own loop)


__all__ = ["PreparedTask", "Task", "build_task", "register_task", "task_names"]
