"""The ``kto:`` section of a run config (option names as in TRL's KTOConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, choice


@dataclass
class KTOConfig:
    """``task: kto`` (Ethayarajh et al. 2024). The reference is the model with its adapter
    switched off. ``desirable_weight``/``undesirable_weight`` balance unequal numbers of
    desirable and undesirable answers (the paper: keep weight x count within 1 to 4/3 of
    each other). ``loss_type: apo_zero_unpaired`` drops the KL reference point (APO-zero)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"  # kto | apo_zero_unpaired

    def validate(self, where: str) -> None:
        choice(f"{where}.loss_type", self.loss_type, ["kto", "apo_zero_unpaired"])
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key} must be > 0, got {getattr(self, key)}")
