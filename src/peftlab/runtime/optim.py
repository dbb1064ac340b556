"""The optimizer every loop uses, its warm-up length, and setting the step's learning rate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftlab.config import TrainConfig
from peftlab.runtime.schedule import lr_multiplier


def make_optimizer(params: Sequence[torch.nn.Parameter] | Sequence[dict[str, Any]],
                   cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over a list of parameters, or over groups ``{"params", "lr_scale"?,
    "weight_decay"?}`` (a method's groups, e.g. LoRA+): a group's lr is always ``train.lr``
    (as scheduled) times its ``lr_scale``, kept in the group so checkpoints restore it."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{**g, "lr_scale": float(g.get("lr_scale", 1.0))} for g in groups]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``train.warmup_steps``, else ``warmup_ratio`` of the run's optimizer steps."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total_steps: int,
           warmup: int) -> float:
    """Set the learning rate of optimizer step ``step`` (0-based); return ``train.lr``'s share
    (groups with an ``lr_scale`` get that multiple of it)."""
    lr = cfg.lr * lr_multiplier(step, total_steps, warmup, cfg.scheduler)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
