"""Reuse the KV cache of prompt prefixes that requests share (e.g. a chat template's system
prompt), so their prefill starts after the shared part.

Only prefixes that two prompts of the same model (adapter) really shared are kept: after a
prompt is prefilled, its longest common prefix with the recent prompts of that model is
stored (keys and values of those positions), if it is at least ``min_tokens`` long and no
stored prefix covers it. A new prompt starts after the longest run of tokens it shares with
a stored prefix (never the whole prompt: its last token must run to give the first logits).
Entries are evicted least recently used.
The KV of a prefix does not depend on what follows it (causal attention), so a reused
prefix computes the same as prefilling it again, up to float rounding of the chunk shapes.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from torch import Tensor

Layers = list[tuple[Tensor, Tensor]]


class PrefixCache:
    def __init__(self, capacity: int = 32, min_tokens: int = 8, recent: int = 16):
        self.capacity, self.min_tokens = capacity, min_tokens
        self.entries: OrderedDict[tuple[str | None, tuple[int, ...]], Layers] = OrderedDict()
        self.recent: dict[str | None, deque[tuple[int, ...]]] = {}
        self._recent_size = recent
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, adapter: str | None, prompt: list[int]) -> tuple[int, Layers] | None:
        """(length, per-layer keys/values) of the longest stored prefix ``prompt`` shares (a
        stored prefix may be longer: its first positions are valid on their own)."""
        tokens = tuple(prompt)
        best, length = None, 0
        for key in self.entries:
            if key[0] == adapter:
                common = min(_common(tokens, key[1]), len(tokens) - 1)
                if common > length:
                    best, length = key, common
        if best is None or length < self.min_tokens:
            return None
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += length
        return length, [(k[:, :, :length], v[:, :, :length]) for k, v in self.entries[best]]

    def remember(self, adapter: str | None, prompt: list[int], layers: Layers) -> None:
        """After ``prompt`` was prefilled into ``layers`` (batch of one): keep the prefix it
        shares with a recent prompt of the same model, unless a stored one covers it."""
        tokens = tuple(prompt)
        recent = self.recent.setdefault(adapter, deque(maxlen=self._recent_size))
        shared = max((_common(tokens, other) for other in recent), default=0)
        recent.append(tokens)
        shared = min(shared, len(tokens) - 1)
        if shared < self.min_tokens or any(
                key[0] == adapter and _common(tokens, key[1]) >= shared for key in self.entries):
            return
        self.entries[(adapter, tokens[:shared])] = [
            (k[:, :, :shared].clone(), v[:, :, :shared].clone()) for k, v in layers]
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - stops at the shorter one on purpose
        if x != y:
            break
        n += 1
    return n
