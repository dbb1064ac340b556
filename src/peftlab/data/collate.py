"""Batching: right-padding collation and length-grouped batch order.

On CPU every padded token costs real time, so batches are formed from examples of
similar length (within a shuffled window, so the order stays random).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from peftlab.models.lm import IGNORE_INDEX


def pad_collate(
    examples: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) into LongTensors.

    Also returns ``attention_mask`` and ``num_target_tokens``: the number of labels
    that count after the causal shift (``labels[:, 1:] != -100``), for token-weighted
    loss averaging across gradient-accumulation steps.
    """
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    longest = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"example {row}: {n} input_ids but {len(ex['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "num_target_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
    }


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of indices with similar lengths; deterministic in (seed, epoch).

    Shuffle, sort by length inside windows of ``50 * batch_size``, cut into batches,
    shuffle the batches. The batch holding the longest example goes first so an
    out-of-memory problem shows up at step 1, not hours in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"peftlab:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    if batches:
        first = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[first] = batches[first], batches[0]
    return batches
