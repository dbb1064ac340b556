"""The ``orpo:`` section of a run config (option names as in TRL's ORPOConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError


@dataclass
class ORPOConfig:
    """``task: orpo`` (Hong et al. 2024). ``beta`` is the paper's lambda, the weight of the
    odds-ratio term. The SFT term is the NLL of the chosen answers only (the paper's
    equation, and our SFT's completion-only loss); ``nll_on_prompt: true`` puts it on the
    whole chosen sequence, prompt included, as TRL's ORPOTrainer does."""

    beta: float = 0.1
    nll_on_prompt: bool = False

    def validate(self, where: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0, got {self.beta}")
