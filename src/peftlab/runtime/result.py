"""What a training loop (the Trainer's, or a task's own) returns to the recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float | None
    best_value: float | None  # of best_metric
    best_step: int | None
    best_metric: str = "val_loss"
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    stopped_by_hook: bool = False  # the Trainer's on_evaluate asked to stop (e.g. pruned)
