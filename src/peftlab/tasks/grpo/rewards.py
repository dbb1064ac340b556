"""GRPO's reward sources: Python functions that may read the data rows' other columns (e.g. the
exact answer of a verifiable problem, as TRL passes dataset columns), and PPO's reward model
and classifier scorers. The total reward is their weighted sum."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from peftlab.config import ConfigError
from peftlab.data.preference import Messages
from peftlab.tasks.grpo.config import GRPOConfig
from peftlab.tasks.ppo.rewards import (
    ClassifierScorer,
    RewardModelScorer,
    adapter_dir_of,
    checked_rewards,
    load_function,
)


class ColumnFunction:
    """A user function ``f(prompts, completions, **columns) -> list[float]``.

    ``prompts[i]`` is the text of prompt i's last user turn, ``completions[i]`` the decoded
    answer, and every other field of the data row arrives as a keyword argument holding one
    value per answer -- those the function names, or all of them if it takes ``**kwargs``.
    """

    def __init__(self, fn: Callable[..., Any] | str):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = load_function(fn, "grpo.reward_function") if isinstance(fn, str) else fn
        params = inspect.signature(self.fn).parameters.values()
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        self.named = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def __call__(self, prompts: list[Messages], responses: list[str],
                 columns: dict[str, list[Any]]) -> torch.Tensor:
        queries = [next((m["content"] for m in reversed(p) if m["role"] == "user"), "")
                   for p in prompts]
        kwargs = {k: v for k, v in columns.items()
                  if self.takes_all or (k in self.named and k not in ("prompts", "completions"))}
        return checked_rewards(self.name, self.fn(queries, list(responses), **kwargs),
                               len(responses))


class ModelSource:
    """PPO's reward model / classifier scorer, with the column-aware call signature."""

    def __init__(self, scorer: Callable[[list[Messages], list[str]], torch.Tensor], name: str):
        self.scorer, self.name = scorer, name

    def __call__(self, prompts: list[Messages], responses: list[str],
                 columns: dict[str, list[Any]]) -> torch.Tensor:
        return self.scorer(prompts, responses).float()


def source_names(cfg: GRPOConfig) -> list[str]:
    """Names of the configured sources, in ``reward_weights`` order (for the metrics log)."""
    names = [f.rpartition(":")[2] for f in cfg.reward_functions]
    if cfg.reward_model:
        names.append("reward_model")
    if cfg.reward_classifier:
        names.append("classifier")
    return names


def check_reward_config(cfg: GRPOConfig, functions: list[Callable] | None = None) -> None:
    """At least one source, fully specified, weights matching (before any model loads).

    ``functions``: function objects given through the Python API instead of by name.
    """
    n = len(functions) if functions is not None else len(cfg.reward_functions)
    n += bool(cfg.reward_model) + bool(cfg.reward_classifier)
    if n == 0:
        raise ConfigError("grpo: no reward: set reward_function (one or a list of "
                          "'module:function'), reward_model or reward_classifier")
    if cfg.reward_classifier and cfg.reward_label is None:
        raise ConfigError("grpo.reward_label: required with grpo.reward_classifier (the label "
                          "whose probability is the reward)")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != n:
        raise ConfigError(f"grpo.reward_weights: {len(cfg.reward_weights)} weights for {n} "
                          "reward sources (functions, then reward_model, then reward_classifier)")
    if functions is None:
        for spec in cfg.reward_functions:
            load_function(spec, "grpo.reward_function")
    for key in ("reward_model", "reward_classifier"):
        if getattr(cfg, key):
            try:
                adapter_dir_of(getattr(cfg, key))
            except FileNotFoundError as exc:
                raise ConfigError(f"grpo.{key}: {exc}") from None


def reward_sources(cfg: GRPOConfig, functions: list[Callable] | None = None) -> list[Callable]:
    """The configured sources, in ``reward_weights`` order."""
    check_reward_config(cfg, functions)
    sources: list[Callable] = [ColumnFunction(f) for f in (functions if functions is not None
                                                           else cfg.reward_functions)]
    if cfg.reward_model:
        sources.append(ModelSource(RewardModelScorer(cfg.reward_model), "reward_model"))
    if cfg.reward_classifier:
        sources.append(ModelSource(ClassifierScorer(cfg.reward_classifier, cfg.reward_label),
                                   "classifier"))
    return sources
