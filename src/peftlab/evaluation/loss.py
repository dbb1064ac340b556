"""Held-out loss and perplexity, computed through the task so every task gets them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from peftlab.runtime.precision import autocast_for


class LossTask(Protocol):
    """What evaluation needs of a task (peftlab.tasks.base.Task has it)."""

    def length(self, example: dict[str, Any]) -> int: ...
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]: ...
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]: ...



@torch.no_grad()
def evaluate_loss(model: nn.Module, task: LossTask, examples: list[dict], batch_size: int,
                  precision: str) -> float:
    """Mean loss per item over ``examples`` (per target token for SFT)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: task.length(examples[i]))
    with autocast_for(precision):
        for start in range(0, len(order), batch_size):
            batch = task.collate([examples[i] for i in order[start:start + batch_size]])
            loss_sum, n = task.loss(model, batch)
            total += float(loss_sum)
            count += n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def score_pairs(model: nn.Module, examples: list[dict[str, Any]], collate: Callable,
                score: Callable, batch_size: int, precision: str,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``score(model, batch) -> (chosen, rejected)`` over every preference pair, in eval mode;
    the shared loop of the reward and DPO validation metrics."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with autocast_for(precision):
        for start in range(0, len(examples), batch_size):
            c, r = score(model, collate(examples[start:start + batch_size]))
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))
