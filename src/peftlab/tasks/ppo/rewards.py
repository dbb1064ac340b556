"""Reward sources for PPO: a peftlab reward model, a peftlab classifier, or a Python function.

Every source is a callable ``(prompts, responses) -> torch.Tensor[batch]`` where
``prompts`` are chat messages (ending with the user turn) and ``responses`` the decoded
answers. Sources are loaded once, kept in eval mode and never trained.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peftlab.config import ConfigError
from peftlab.data.preference import Messages, encode_exchange
from peftlab.files import read_json
from peftlab.methods.chain import load_adapter
from peftlab.models import load_model
from peftlab.tasks.classification.predict import load_classifier
from peftlab.tasks.heads import load_head
from peftlab.tasks.ppo.config import PPOConfig
from peftlab.tasks.reward.task import HEAD_FILE, sequence_scores

Scorer = Callable[[list[Messages], list[str]], torch.Tensor]


def adapter_dir_of(path: str | Path) -> Path:
    """An adapter directory, given it or a run's output directory (which holds ``adapter/``)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    raise FileNotFoundError(f"{path}: no adapter_config.json here or in {path / 'adapter'} "
                            "(expected a peftlab run directory or its adapter directory)")


def base_model_of(adapter: Path) -> str:
    path = adapter / "adapter_config.json"
    name = read_json(path).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{path}: no 'base_model_name_or_path'; cannot tell the base model")
    return str(name)


class RewardModelScorer:
    """Scalar score of a ``task: reward`` model on the rendered (prompt, response) exchange."""

    def __init__(self, path: str | Path, batch_size: int = 16):
        adapter = adapter_dir_of(path)
        self.model, self.tokenizer = load_model(base_model_of(adapter),
                                                kind="sequence_classification", num_labels=1)
        load_adapter(self.model, adapter)
        if (adapter / HEAD_FILE).is_file():
            load_head(self.model, adapter / HEAD_FILE)
        self.model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[Messages], responses: list[str]) -> torch.Tensor:
        seqs = [encode_exchange(p, r, self.tokenizer)["input_ids"]
                for p, r in zip(prompts, responses, strict=True)]
        out = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            longest = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), longest), self.tokenizer.pad_token_id)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            out.append(sequence_scores(self.model, ids, mask)[:, 0])
        return torch.cat(out).float()


class ClassifierScorer:
    """Probability of ``label`` under a ``task: classification`` model, on the response text."""

    def __init__(self, path: str | Path, label: str, batch_size: int = 16):
        self.classifier = load_classifier(adapter_dir_of(path))
        labels = [str(x) for x in self.classifier.labels]
        if str(label) not in labels:
            raise ConfigError(f"ppo.reward_label: {label!r} is not a label of the classifier "
                              f"{path} (labels: {labels})")
        self.index = labels.index(str(label))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[Messages], responses: list[str]) -> torch.Tensor:
        probs = self.classifier.predict_proba(responses, batch_size=self.batch_size)
        return probs[:, self.index].float()


class FunctionScorer:
    """A user function ``f(prompts, responses) -> list[float]``.

    ``prompts[i]`` is the text of the last user turn of prompt i (the prompt itself for
    single-turn data), ``responses[i]`` the decoded answer.
    """

    def __init__(self, fn: Callable[[list[str], list[str]], Any] | str):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = load_function(fn) if isinstance(fn, str) else fn

    def __call__(self, prompts: list[Messages], responses: list[str]) -> torch.Tensor:
        queries = [next((m["content"] for m in reversed(p) if m["role"] == "user"), "")
                   for p in prompts]
        return checked_rewards(self.name, self.fn(queries, list(responses)), len(responses))


def checked_rewards(name: str, values: Any, expected: int) -> torch.Tensor:
    """A user reward function's output as a float tensor, or one line saying what is wrong
    with it (not numbers, the wrong count, NaN/inf) instead of a failure deep in the loss."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reward function {name}: must return a list of numbers "
                         f"({exc})") from None
    if len(values) != expected:
        raise ValueError(f"reward function {name}: returned {len(values)} rewards for "
                         f"{expected} completions")
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"reward function {name}: reward {bad} is {values[bad]}")
    return torch.tensor(values, dtype=torch.float32)


def load_function(spec: str, key: str = "ppo.reward_function") -> Callable:
    """``"package.module:function"`` -> the function; errors name the config ``key``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {module_name!r} has no function {attr!r}")
    return fn


def check_reward_config(cfg: PPOConfig) -> None:
    """Exactly one reward source, fully specified (checked before any model is loaded)."""
    given = [k for k in ("reward_model", "reward_classifier", "reward_function")
             if getattr(cfg, k)]
    if len(given) != 1:
        raise ConfigError("ppo: set exactly one of reward_model, reward_classifier, "
                          f"reward_function (got {given or 'none'})")
    if cfg.reward_classifier and cfg.reward_label is None:
        raise ConfigError("ppo.reward_label: required with ppo.reward_classifier (the label "
                          "whose probability is the reward)")
    if cfg.reward_function:
        load_function(cfg.reward_function)
    for key in ("reward_model", "reward_classifier"):
        if getattr(cfg, key):
            try:
                adapter_dir_of(getattr(cfg, key))
            except FileNotFoundError as exc:
                raise ConfigError(f"ppo.{key}: {exc}") from None


def reward_source(cfg: PPOConfig) -> Scorer:
    """The scorer the config names."""
    check_reward_config(cfg)
    if cfg.reward_model:
        return RewardModelScorer(cfg.reward_model)
    if cfg.reward_classifier:
        return ClassifierScorer(cfg.reward_classifier, cfg.reward_label)
    return FunctionScorer(cfg.reward_function)
