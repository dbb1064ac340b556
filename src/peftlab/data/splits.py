"""Deterministic train/validation splits."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_off(rows: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split ``rows`` into (train, validation) with ``fraction`` held out, seeded."""
    if fraction <= 0:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(rows)))
    if n_val >= len(rows):
        raise ValueError(f"validation_split={fraction} leaves no training rows ({len(rows)} rows)")
    held = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])
