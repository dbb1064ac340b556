"""Dropout whose random mask costs a sixth of torch's on a CPU, for training loops.

Why: torch's CPU dropout draws one random number per element (``bernoulli_``, ~4 ns each on
the 2-core EPYC we measure on), which made a third of a MiniLM classification step (BERT
drops out the attention probabilities and three hidden states per layer, p = 0.1). Here one
64-bit draw gives four 16-bit lanes, each compared with a threshold: the same Bernoulli keep
mask up to ``p`` rounded to a multiple of 1/65536, at ~6x less time per element.

Inside :func:`fast_dropout` (the Trainer opens it around its loop on a CPU), every
``nn.Dropout`` with ``p > 0`` is swapped for :class:`FastDropout`; attention dropout goes
through :func:`apply_dropout` in :mod:`peftlab.runtime.cpu_attention`. On leaving, the
original modules come back, so what is saved, merged or served is the model as loaded.
Compiled blocks do not need it: inductor generates its own fused random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_LANES = 65536  # 16-bit lanes: p is rounded to a multiple of 1/65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float,
              device: torch.device | str | None = None) -> Tensor:
    """A bool tensor of ``shape``, each element True with probability ``1 - p`` (rounded as
    above), from torch's default generator (``torch.manual_seed`` reproduces it)."""
    n = math.prod(shape)
    words = torch.randint(-(2 ** 63), 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64,
                          device=device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return lanes >= round(p * _LANES) - _LANES // 2


def kept_fraction(p: float) -> float:
    """``1 - p`` as :func:`keep_mask` realises it (the inverse scale of kept elements)."""
    return 1.0 - round(p * _LANES) / _LANES


class _MaskedScale(torch.autograd.Function):
    """``x * mask * scale``, saving the bool mask (1 byte per element, as torch's dropout)
    rather than a mask in the activation dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.where(mask, x, 0.0).mul_(scale)  # no cast of the mask to x's dtype

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0).mul_(ctx.scale), None, None


def apply_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` with :func:`keep_mask` (CPU tensors; elsewhere torch's own)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    keep = kept_fraction(p)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / keep)


class FastDropout(nn.Module):
    """``nn.Dropout(p)`` computed by :func:`apply_dropout`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return apply_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextmanager
def fast_dropout(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``model``'s dropouts use :func:`keep_mask`; yields how many dropout
    sites were switched (0 when disabled or the model has no dropout)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if enabled:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    fast = FastDropout(child.p)
                    fast.train(child.training)
                    setattr(parent, name, fast)
                    swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
