"""Dropout whose random mask costs a sixth of torch's on a CPU, for training loops.

Why: torch's CPU dropout draws one random number per element (``bernoulli_``, ~4 ns each on
the 2-core EPYC we measure on), which made a third of a MiniLM classification step (BERT
drops out the attention probabilities and three hidden states per layer, p = 0.1). Here one
64-bit word gives four 16-bit lanes, each compared with a threshold: the same Bernoulli keep
mask up to ``p`` rounded to a multiple of 1/65536. The words are SplitMix64 outputs of a
counter and one seed drawn from torch's generator (``torch.manual_seed`` reproduces them):
ten vectorised integer passes took 1.0 ms for a MiniLM attention mask's 393k words where
``torch.randint`` (Mersenne Twister, one word at a time) took 2.5 ms.

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

from peftlab.runtime.module_swap import swapped_modules

_LANES = 65536  # 16-bit lanes: p is rounded to a multiple of 1/65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float,
              device: torch.device | str | None = None) -> Tensor:
    """A bool tensor of ``shape``, each element True with probability ``1 - p`` (rounded as
    above), from torch's default generator (``torch.manual_seed`` reproduces it)."""
    n = math.prod(shape)
    words = random_words((n + 3) // 4, device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return lanes >= round(p * _LANES) - _LANES // 2


# SplitMix64's constants (Steele, Lea, Flood 2014) as signed 64-bit integers
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def random_words(count: int, device: torch.device | str | None = None) -> Tensor:
    """``count`` uniformly random int64 words: SplitMix64 of the counter 0..count-1 offset by
    a seed that is one draw from torch's default generator. int64 arithmetic wraps like the
    unsigned original; the shifts are arithmetic in torch, so each is masked to a logical one."""
    seed = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (1,)))
    x = torch.arange(count, dtype=torch.int64, device=device).mul_(_GOLDEN).add_(seed)
    for shift, mix in ((30, _MIX1), (27, _MIX2), (31, None)):
        x.bitwise_xor_((x >> shift).bitwise_and_((1 << (64 - shift)) - 1))
        if mix is not None:
            x.mul_(mix)
    return x


def kept_fraction(p: float) -> float:
    """``1 - p`` as :func:`keep_mask` realises it (the inverse scale of kept elements)."""
    return 1.0 - round(p * _LANES) / _LANES


class _MaskedScale(torch.autograd.Function):
    """``x * mask * scale``, saving the mask as bytes (1 per element, as torch's dropout).

    Why the detour through ``uint8``: on a CPU, element-wise ops that mix a bool tensor with
    bf16 take a slow per-element casting path (``torch.where(mask, x, 0.0)`` on a MiniLM
    attention-probability tensor: 1.4 ms), while a byte tensor reinterpreted from the bool one
    casts to the activation dtype in a vectorised pass and the multiply is same-dtype (0.15 +
    0.2 ms). The scale is applied as a Python number afterwards, so it is not rounded to bf16
    (1/0.9 in bf16 is 0.15% off, which would bias every activation)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        keep = mask.view(torch.uint8)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep.to(x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep.to(grad.dtype)).mul_(ctx.scale), None, None


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

    def replacement(child: nn.Module) -> nn.Module | None:
        return FastDropout(child.p) if type(child) is nn.Dropout and child.p > 0 else None

    with swapped_modules(model, replacement if enabled else lambda _: None) as count:
        yield count
