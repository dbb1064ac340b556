"""Deterministic train/validation splits (random, grouped by document, stratified) and
k-shot sampling."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from typing import Any, TypeVar

from peftlab.data.classification import grouped_split as split_by_groups
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

    A thin wrapper over :func:`peftlab.data.classification.grouped_split` for dict rows.
    """
    groups = []
    for i, row in enumerate(rows):
        if key not in row:
            raise ValueError(f"row {i + 1}: group field {key!r} is missing "
                             f"(available: {', '.join(map(str, row)) or 'no fields'})")
        groups.append(json.dumps(row[key], sort_keys=True, default=str))
    try:
        return split_by_groups(rows, groups, fraction, seed)
    except ValueError as err:
        raise ValueError(f"grouped split by {key!r}: {err}") from None


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
