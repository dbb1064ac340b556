"""The ``dpo:`` section of a run config (registered with the task, validated by peftlab.config)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, choice


@dataclass
class DPOConfig:
    """``task: dpo``. reference: the base model with the adapter switched off at every step
    (``disabled_adapter``), or the initial policy's log-probs computed once and cached in
    OUTPUT_DIR/reference_logps.safetensors (``precomputed``; any method)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (sigmoid loss only)
    loss_type: str = "sigmoid"  # sigmoid | ipo
    reference: str = "disabled_adapter"  # disabled_adapter | precomputed

    def validate(self, where: str) -> None:
        choice(f"{where}.loss_type", self.loss_type, ["sigmoid", "ipo"])
        choice(f"{where}.reference", self.reference, ["disabled_adapter", "precomputed"])
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"{where}.label_smoothing only applies to loss_type 'sigmoid'")
