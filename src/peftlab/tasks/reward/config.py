"""The ``reward:`` section of a run config (registered with the task, validated by peftlab.config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardConfig:
    """``task: reward``: Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin)."""

    margin: float = 0.0
    margin_field: str | None = None  # a per-row margin column (added to ``margin``)
