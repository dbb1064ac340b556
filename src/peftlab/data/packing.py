"""Packing: several short SFT examples per row, without attention across their boundaries.

On CPU every padded position costs as much as a real one. Packing places examples into
rows of up to ``max_length`` tokens (first-fit decreasing: a deterministic, near-optimal
bin packing) so a batch carries almost no padding.

Packed examples must not see each other. Each packed row carries ``position_ids`` that
restart at 0 for every example; the SFT task then calls the transformers backbone with
these positions and *no* 2D attention mask, and transformers builds a block-diagonal
causal mask from the position resets (``masking_utils.find_packed_sequence_indices``;
tests/test_packing.py checks it on transformers 5.23 with sdpa and eager attention). Rotary
embeddings use the same restarted positions, so every example is computed exactly as if it
were alone: summed losses of packed and unpacked batches agree to float tolerance.

Labels: the first label of every packed example is set to -100. Unpacked, the first token
of an example is never predicted (nothing comes before it); packed, it would be predicted
from the previous example's last token.

Padding after the last example gets its own restarted positions, so it forms a separate
"example" that real tokens never attend to (they come before it).
"""

from __future__ import annotations

from typing import Any

import torch

from peftlab.data.collate import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, longest items first, each into the first bin with room.

    A max segment tree over bins finds the first bin with room in O(log n), so packing
    100k examples takes well under a second. Unopened bins count as empty, so the first
    bin with room is an open one if any fits.
    """
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={capacity}")
        if n < 1:
            raise ValueError(f"example {i} is empty")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [capacity] * (2 * size)  # free[node] = most room in any bin below node
    bins: list[list[int]] = []
    for i in order:
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= lengths[i]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_examples(examples: list[dict[str, Any]],
                  max_length: int) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Packed rows ``{"input_ids", "labels", "position_ids"}`` and packing statistics."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    bins = first_fit_decreasing(lengths, max_length)
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ex = examples[i]
            if len(ex["labels"]) != lengths[i]:
                raise ValueError(f"example {i}: {lengths[i]} input_ids but {len(ex['labels'])} labels")
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            positions += list(range(lengths[i]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    tokens = sum(lengths)
    stats = {
        "examples": len(examples),
        "packed_rows": len(packed),
        "max_length": max_length,
        "tokens": tokens,
        "fill": round(tokens / (len(packed) * max_length), 4) if packed else 0.0,
    }
    return packed, stats


def collate_packed(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad packed (or plain) examples; ``position_ids`` restart at every example.

    ``attention_mask`` marks the real tokens (for token counts); the SFT task does not pass
    it to the model, as transformers only detects packing without a 2D mask.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    longest = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    position_ids = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"example {row}: {n} input_ids but {len(ex['labels'])} labels")
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
        positions = ex.get("position_ids")
        position_ids[row, :n] = (torch.as_tensor(positions, dtype=torch.long) if positions
                                 is not None else torch.arange(n))
        position_ids[row, n:] = torch.arange(longest - n)  # padding: a separate sequence
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "num_target_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
    }
