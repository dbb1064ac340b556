"""The ``simpo:`` section of a run config (option names as in TRL's CPOConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError


@dataclass
class SimPOConfig:
    """``task: simpo`` (Meng et al. 2024). ``beta`` scales the length-normalised log-probs,
    ``simpo_gamma`` is the target margin; ``cpo_alpha`` > 0 adds the chosen answers' NLL
    (CPO-SimPO). TRL's equivalent: ``CPOConfig(loss_type="simpo", cpo_alpha=0)``."""

    beta: float = 2.0
    simpo_gamma: float = 1.0
    label_smoothing: float = 0.0
    cpo_alpha: float = 0.0

    def validate(self, where: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0, got {self.beta}")
        if self.simpo_gamma < 0 or self.cpo_alpha < 0:
            raise ConfigError(f"{where}: simpo_gamma and cpo_alpha must be >= 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 0.5), "
                              f"got {self.label_smoothing}")
