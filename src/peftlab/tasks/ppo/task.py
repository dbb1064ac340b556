"""``task: ppo``: PPO with its own loop (peftlab.tasks.ppo.loop) on prompts; the reward comes
from a reward model, a classifier or a Python function (peftlab.tasks.ppo.rewards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from peftlab.config import ConfigError, RunConfig
from peftlab.data.sft import ensure_chat_template
from peftlab.methods.reference import check_reference_method
from peftlab.runtime.result import TrainResult
from peftlab.tasks.base import PreparedTask, Task, TaskSpec, register_task
from peftlab.tasks.ppo.config import PPOConfig
from peftlab.tasks.ppo.data import prepare_prompts
from peftlab.tasks.ppo.loop import PPOTrainer
from peftlab.tasks.ppo.rewards import Scorer, check_reward_config, reward_source


class PPOTask(Task):
    """``task: ppo``: prompts in, its own loop (:meth:`fit`) instead of the Trainer's.

    ``reward`` may be set to any scorer ``(prompt messages, responses) -> Tensor`` before
    training (the Python API's way to pass a function object); otherwise it comes from
    ``cfg.ppo``.
    """

    own_loop = True

    def __init__(self, reward: Scorer | None = None):
        self.reward = reward

    def fit(self, model: nn.Module, tokenizer, train: list[dict], val: list[dict],
            cfg: RunConfig, output_dir: str | Path, resume: bool | str | Path = False,
            progress: bool = True) -> TrainResult:
        """``resume``: True for the newest complete checkpoint in output_dir, or a path."""
        scorer = self.reward if self.reward is not None else reward_source(cfg.task_config)
        trainer = PPOTrainer(model, tokenizer, train, val, cfg, output_dir, scorer, progress)
        return trainer.train(resume)


def build_ppo_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: ppo`` (a causal LM policy; prompts only)."""
    check_reward_config(cfg.task_config)
    check_reference_method(cfg.method_name, "task: ppo")
    if cfg.train.max_length <= cfg.task_config.max_new_tokens:
        raise ConfigError(f"train.max_length ({cfg.train.max_length}) must exceed "
                          f"ppo.max_new_tokens ({cfg.task_config.max_new_tokens}): prompts need room")
    ensure_chat_template(tokenizer)
    train, val, report = prepare_prompts(cfg, tokenizer)
    return PreparedTask(PPOTask(), train, val, report, model_kind="causal_lm")


register_task(TaskSpec("ppo", build_ppo_task, PPOConfig))
