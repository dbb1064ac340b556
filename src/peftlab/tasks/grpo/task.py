"""``task: grpo``: GRPO with its own loop (peftlab.tasks.grpo.loop) on prompts; rewards from
Python functions (which may read the rows' other columns), a reward model or a classifier."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.config import ConfigError, RunConfig
from peftlab.data.sft import ensure_chat_template
from peftlab.methods.reference import check_reference_method
from peftlab.runtime.result import TrainResult
from peftlab.tasks.base import PreparedTask, Task, TaskSpec, register_task
from peftlab.tasks.grpo.config import GRPOConfig
from peftlab.tasks.grpo.loop import GRPOTrainer
from peftlab.tasks.grpo.rewards import check_reward_config, reward_sources
from peftlab.tasks.ppo.data import prepare_prompts


class GRPOTask(Task):
    """``task: grpo``: prompts in, its own loop (:meth:`fit`) instead of the Trainer's.

    ``reward_functions`` may be set to function objects ``f(prompts, completions, **columns)``
    before training (the Python API's way to pass them); they replace ``grpo.reward_function``
    (a reward model or classifier from the config is still added).
    """

    own_loop = True

    def __init__(self, reward_functions: list[Callable] | None = None):
        self.reward_functions = reward_functions

    def fit(self, model: nn.Module, tokenizer, train: list[dict], val: list[dict],
            cfg: RunConfig, output_dir: str | Path, resume: bool | str | Path = False,
            progress: bool = True) -> TrainResult:
        """``resume``: True for the newest complete checkpoint in output_dir, or a path."""
        sources = reward_sources(cfg.task_config, self.reward_functions)
        trainer = GRPOTrainer(model, tokenizer, train, val, cfg, output_dir, sources, progress)
        return trainer.train(resume)


def build_grpo_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: grpo`` (a causal LM policy; prompts and their columns)."""
    g: GRPOConfig = cfg.task_config
    check_reward_config(g)
    if g.beta:
        check_reference_method(cfg.method_name, "task: grpo with grpo.beta > 0")
    if cfg.train.max_length <= g.max_completion_length:
        raise ConfigError(f"train.max_length ({cfg.train.max_length}) must exceed "
                          f"grpo.max_completion_length ({g.max_completion_length}): prompts "
                          "need room")
    if cfg.train.grad_accum != 1:
        raise ConfigError("train.grad_accum: task grpo accumulates gradients over "
                          "generation_batch_size / steps_per_generation answers per optimizer "
                          "step by itself; set train.grad_accum to 1")
    ensure_chat_template(tokenizer)
    train, val, report = prepare_prompts(cfg, tokenizer, max_new_tokens=g.max_completion_length)
    return PreparedTask(GRPOTask(), train, val, report, model_kind="causal_lm")


register_task(TaskSpec("grpo", build_grpo_task, GRPOConfig))
