"""The Task protocol: what a batch looks like and how its loss is computed.

The Trainer only ever calls these methods; it never branches on the task's name.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Task(Protocol):
    def length(self, example: dict[str, Any]) -> int:
        """Tokens in one example (for length-grouped batching and throughput)."""

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Turn a list of examples into one batch of tensors."""

    def count(self, batch: dict[str, Any]) -> int:
        """How many items ``loss`` will sum over for this batch (known before the forward)."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch and the number of items it is summed over.

        Returning a sum (not a mean) lets the Trainer normalise exactly across
        gradient-accumulation micro-batches of unequal sizes.
        """

    # Optional: tasks may also define
    #   metrics(model, examples, batch_size, precision) -> dict[str, float]
    # whose values the Trainer logs as val_<name> at every evaluation and can select on
    # (train.best_metric) and stop early on (train.early_stopping_patience).
