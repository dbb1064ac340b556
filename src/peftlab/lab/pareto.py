"""The Pareto front of a sweep: trials no other trial beats on every axis at once.

The axes are the best validation metric (higher or lower is better, by its name), trainable
parameters, training seconds and peak RSS (all lower is better). A method comparison reads
the front: a trial on it is the best choice for some weighting of quality against cost; one
off it is dominated (another trial is at least as good everywhere and better somewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Point(Protocol):
    best_value: float | None
    trainable_params: int | None
    seconds: float | None
    peak_rss_mb: float | None


def _costs(p: Point, lower_is_better: bool) -> tuple[float, float, float, float]:
    metric = p.best_value if lower_is_better else -p.best_value
    return (metric, float(p.trainable_params or 0), float(p.seconds or 0.0),
            float(p.peak_rss_mb or 0.0))


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def pareto_front(points: Sequence[Point], lower_is_better: bool) -> list[Point]:
    """The non-dominated points among those with a metric value, best metric first."""
    scored = [(p, _costs(p, lower_is_better)) for p in points if p.best_value is not None]
    front = [p for p, c in scored if not any(dominates(o, c) for _, o in scored)]
    return sorted(front, key=lambda p: _costs(p, lower_is_better))
