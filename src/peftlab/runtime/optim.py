"""The optimizer every loop uses, its warm-up length, and setting the step's learning rate."""

from __future__ import annotations

import torch

from peftlab.config import TrainConfig
from peftlab.runtime.schedule import lr_multiplier


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """``train.warmup_steps``, else ``warmup_ratio`` of the run's optimizer steps."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total_steps: int,
           warmup: int) -> float:
    """Set (and return) the learning rate of optimizer step ``step`` (0-based)."""
    lr = cfg.lr * lr_multiplier(step, total_steps, warmup, cfg.scheduler)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
