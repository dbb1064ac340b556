"""Swap some of a model's sub-modules for the length of a block, then put the originals back.

Why one helper: the CPU kernels (fast dropout, fast RMSNorm) and packed decoding all replace
modules only while a loop runs, so that what is saved, merged or served afterwards is the
model as loaded; each had its own copy of this walk and restore.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def swapped_modules(model: nn.Module,
                    replacement: Callable[[nn.Module], nn.Module | None]) -> Iterator[int]:
    """Inside the block every sub-module of ``model`` for which ``replacement`` returns a
    module is replaced by it (in the original's train/eval mode); on leaving the originals
    come back, in the mode their replacements ended in. Yields how many were swapped."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                new.train(child.training)
                setattr(parent, name, new)
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
