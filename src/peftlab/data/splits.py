"""Deterministic train/validation splits: random, grouped (by document) and stratified."""

from __future__ import annotations

import json
import random
from typing import Any, TypeVar

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


def grouped_split(rows: list[dict[str, Any]], key: str, fraction: float,
                  seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split so that no value of ``row[key]`` (e.g. a document id) is on both sides.

    Rows of one document are near-duplicates of each other in style and content; splitting
    them across train and validation overstates how well the model generalises. Groups are
    visited in a seeded order and held out while that brings the held-out row count closer
    to ``fraction * len(rows)`` (or, if none does, the smallest group); at least one group
    lands on each side. Both outputs keep the input order.
    """
    if fraction <= 0:
        return list(rows), []
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"row {i + 1}: group field {key!r} is missing "
                             f"(available: {', '.join(map(str, row)) or 'no fields'})")
        groups.setdefault(json.dumps(row[key], sort_keys=True, default=str), []).append(i)
    if len(groups) < 2:
        raise ValueError(f"grouped split by {key!r} needs at least 2 groups, found {len(groups)}")
    order = sorted(groups)
    random.Random(f"peftlab-grouped:{seed}").shuffle(order)
    target = fraction * len(rows)
    held: list[str] = []
    count = 0
    for g in order:
        size = len(groups[g])
        if len(held) < len(groups) - 1 and abs(count + size - target) < abs(count - target):
            held.append(g)
            count += size
    if not held:  # every group is more than twice the target: hold out the smallest
        held.append(min(order, key=lambda g: len(groups[g])))
    held_rows = {i for g in held for i in groups[g]}
    return ([r for i, r in enumerate(rows) if i not in held_rows],
            [r for i, r in enumerate(rows) if i in held_rows])


def stratified_split(rows: list[dict[str, Any]], label_key: str, fraction: float,
                     seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ``fraction`` of every class of ``row[label_key]`` (labels compared as strings).

    A thin wrapper over :func:`peftlab.data.classification.stratified_split`.
    """
    from peftlab.data.classification import stratified_split as split_by_labels

    labels = []
    for i, row in enumerate(rows):
        if row.get(label_key) is None:
            raise ValueError(f"row {i + 1}: label field {label_key!r} is missing or null")
        labels.append(str(row[label_key]).strip())
    return split_by_labels(rows, labels, fraction, seed)
