"""The running decode batch of continuous batching: rows join and leave between steps.

Every row holds one request's KV cache, left-padded to the longest row; the attention mask
marks the padding and each row's position is its own count of real tokens, so a row
computes exactly what it would alone (up to float rounding of batched matmuls). A request
whose prompt was prefilled on its own joins by concatenation (the shorter side is padded
on the left); finished rows leave by index, and padding columns no row needs any more are
dropped from the left. Each layer keeps its keys and values in a buffer with room to grow
(:mod:`peftlab.models.growing_cache`), so a decode step writes its new position in place.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch
from torch import Tensor
from transformers import DynamicCache

from peftlab.models.growing_cache import cache_layers, growing_cache

T = TypeVar("T")


class DecodeBatch(Generic[T]):
    """Rows (any per-row payload, e.g. a request), their KV cache, mask and last token."""

    def __init__(self) -> None:
        self.rows: list[T] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (rows, cached length)
        self.last = torch.zeros(0, dtype=torch.long)  # each row's newest token: the next input

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, row: T, cache: DynamicCache, token: int) -> None:
        """Add a row whose prompt is in ``cache`` (batch of one, no padding) and whose first
        generated ``token`` is the next input."""
        new = cache_layers(cache)
        length = new[0][0].shape[-2]
        if not self.rows:
            self.cache, self.mask = growing_cache(new), torch.ones(1, length, dtype=torch.long)
        else:
            old = cache_layers(self.cache)
            if len(old) != len(new):
                raise ValueError(f"caches with {len(old)} and {len(new)} layers cannot be joined")
            width = max(self.mask.shape[1], length)
            merged = [(torch.cat([_pad_left(k0, width), _pad_left(k1, width)]),
                       torch.cat([_pad_left(v0, width), _pad_left(v1, width)]))
                      for (k0, v0), (k1, v1) in zip(old, new, strict=True)]
            self.cache = growing_cache(merged)
            self.mask = torch.cat([_pad_left(self.mask, width),
                                   _pad_left(torch.ones(1, length, dtype=torch.long), width)])
        self.rows.append(row)
        self.last = torch.cat([self.last, torch.tensor([token], dtype=torch.long)])

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); drop padding no remaining row needs."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            self.last = torch.zeros(0, dtype=torch.long)
            return
        index = torch.tensor(indices, dtype=torch.long)
        self.mask, self.last = self.mask[index], self.last[index]
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else 0
        layers = [(k[index, :, first:], v[index, :, first:]) for k, v in cache_layers(self.cache)]
        self.cache = growing_cache(layers)
        self.mask = self.mask[:, first:]

    def step_inputs(self) -> dict[str, Tensor]:
        """input_ids, attention_mask and position_ids of the next decode step (and grow the
        mask by the column that step writes)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        return {"input_ids": self.last[:, None], "attention_mask": self.mask,
                "position_ids": self.mask.sum(-1, keepdim=True) - 1}


def _pad_left(t: Tensor, width: int) -> Tensor:
    """Zero-pad the length axis (-2 for KV tensors, -1 for a mask) on the left to ``width``."""
    axis = -1 if t.ndim == 2 else -2
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)
