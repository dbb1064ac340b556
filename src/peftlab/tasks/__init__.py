"""Tasks: what a batch is, how its loss is computed, and how the task's data is prepared."""

from __future__ import annotations

from typing import Any

from peftlab.tasks.base import Task


def build_task(cfg, tokenizer) -> tuple[Task, list[dict], list[dict], dict[str, Any]]:
    """The run's task object plus its prepared train/validation examples and data report."""
    if cfg.task == "sft":
        from peftlab.data.sft import ensure_chat_template
        from peftlab.tasks.sft import SFTTask, prepare_sft_data

        ensure_chat_template(tokenizer)
        train, val, report = prepare_sft_data(cfg, tokenizer)
        return SFTTask(pad_id=tokenizer.pad_token_id), train, val, report
    raise ValueError(f"task: {cfg.task!r} is not implemented")


MODEL_KIND = {"sft": "causal_lm"}

__all__ = ["MODEL_KIND", "Task", "build_task"]
