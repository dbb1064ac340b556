"""Held-out loss and perplexity, computed through the task so every task gets them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from peftlab.runtime.device import model_device, to_device
from peftlab.runtime.distributed import World
from peftlab.runtime.precision import autocast_for


class LossTask(Protocol):
    """What evaluation needs of a task (peftlab.tasks.base.Task has it)."""

    def length(self, example: dict[str, Any]) -> int: ...
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]: ...
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]: ...



@torch.no_grad()
def evaluate_loss(model: nn.Module, task: LossTask, examples: list[dict], batch_size: int,
                  precision: str, world: World | None = None, lockstep: bool = False) -> float:
    """Mean loss per item over ``examples`` (per target token for SFT).

    With a ``world`` of several ranks each evaluates every ``size``-th batch of the one-process
    batching and the loss sums and counts are summed over ranks: the same number (up to float
    summation order) at 1/size of the work per rank. ``lockstep`` (a sharded FSDP model, whose
    forward is a collective): a rank with fewer batches runs an extra forward it discards.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    device = model_device(model)
    order = sorted(range(len(examples)), key=lambda i: task.length(examples[i]))
    starts = list(range(0, len(order), batch_size))
    mine = world.shard(starts)
    passes = math.ceil(len(starts) / world.size) if lockstep else len(mine)
    total, count = 0.0, 0
    with autocast_for(precision):
        for k in range(passes):
            start = mine[k] if k < len(mine) else starts[0]
            batch = task.collate([examples[i] for i in order[start:start + batch_size]])
            loss_sum, n = task.loss(model, to_device(batch, device))
            if k < len(mine):
                total += float(loss_sum)
                count += n
    model.train(was_training)
    total, count = world.sum([total, count])
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
    device = model_device(model)
    with autocast_for(precision):
        for start in range(0, len(examples), batch_size):
            c, r = score(model, to_device(collate(examples[start:start + batch_size]), device))
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))
