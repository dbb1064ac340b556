"""Deterministic train/validation splits (random, grouped by document, stratified) and
k-shot sampling."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from typing import Any, TypeVar

from peftlab.data.classification import stratified_split as split_by_labels

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
    labels = []
    for i, row in enumerate(rows):
        if row.get(label_key) is None:
            raise ValueError(f"row {i + 1}: label field {label_key!r} is missing or null")
        labels.append(str(row[label_key]).strip())
    return split_by_labels(rows, labels, fraction, seed)


def sample_k_per_class(rows: list[T], label_key: str | Callable[[T], Any], k: int, seed: int,
                       classes: list[str] | None = None,
                       content_key: Callable[[T], str] | None = None) -> list[T]:
    """Exactly ``k`` rows of every class (labels compared as strings), in input order.

    Few-shot results vary a lot with *which* k rows are drawn, so the draw has to be
    reproducible from the seed alone: every row is ranked by a seeded hash of its content
    (``content_key``; default: the row as sorted JSON) and each class keeps its k lowest
    ranks. Shuffling the file, or adding rows of other classes, does not change the sample.
    ``classes`` (e.g. ``data.labels``) must each have k rows, even those absent from ``rows``;
    a class with fewer raises ValueError naming it.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    label_of = label_key if callable(label_key) else (lambda row: row[label_key])
    content = content_key or (lambda row: json.dumps(row, sort_keys=True, default=str))
    by_class: dict[str, list[int]] = {c: [] for c in classes or []}
    for i, row in enumerate(rows):
        label = label_of(row)
        if label is None:
            raise ValueError(f"row {i + 1}: the label is missing or null")
        by_class.setdefault(str(label).strip(), []).append(i)
    short = {c: len(m) for c, m in by_class.items() if len(m) < k}
    if short:
        c, n = sorted(short.items())[0]
        raise ValueError(f"class {c!r} has {n} row(s), fewer than k={k} "
                         f"(rows per class: {({c: len(m) for c, m in sorted(by_class.items())})})")

    def rank(i: int) -> tuple[bytes, int]:
        digest = hashlib.sha256(f"peftlab-k-shot:{seed}\0{content(rows[i])}".encode()).digest()
        return digest, i  # identical rows tie: either copy is the same content

    keep = {i for members in by_class.values() for i in sorted(members, key=rank)[:k]}
    return [r for i, r in enumerate(rows) if i in keep]
