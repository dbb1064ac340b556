"""Dropout whose random mask costs a sixth of torch's on a CPU, for training loops.

Why: torch's CPU dropout draws one random number per element (``bernoulli_``, ~4 ns each on
the 2-core EPYC we measure on), which made a third of a MiniLM classification step (BERT
drops out the attention probabilities and three hidden states per layer, p = 0.1). Here one
64-bit draw gives four 16-bit lanes, each compared with a threshold: the same Bernoulli keep
mask up to ``p`` rounded to a multiple of 1/65536, at ~6x less time per element.

Inside :func:`fast_dropout` (the Trainer opens it around its loop on a CPU), every
``nn.Dropout`` with ``p > 0`` is swapped for :class:`FastDropout` and an SDPA attention with a
dropout probability runs as softmax -> our mask -> matmul (:func:`sdpa_fast_dropout`,
registered with transformers' ``AttentionInterface``; without dropout it is transformers' own
SDPA call). On leaving, the original modules and attention implementation come back, so
what is saved, merged or served is the model as loaded. Compiled blocks do not need it:
inductor generates its own fused random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "peftlab_sdpa_fast_dropout"
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


def sdpa_fast_dropout(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' SDPA attention, except that with a dropout probability on a CPU the
    probabilities are dropped out by :func:`keep_mask` (what SDPA's math path does, with
    torch's slow mask). Shapes as transformers passes them: (batch, heads, length, dim)."""
    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if dropout == 0.0 or query.device.type != "cpu" or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    q_len, kv_len = scores.shape[-2:]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :kv_len]
    elif causal and q_len > 1:
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).triu(
            kv_len - q_len + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    # in the scores' dtype: the softmax kernel accumulates in fp32 and rounds once, where
    # autocast would write fp32 probabilities and cast them back for the matmul
    with torch.autocast(query.device.type, enabled=False):
        probs = torch.softmax(scores.to(value.dtype), dim=-1)
    probs = apply_dropout(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, sdpa_fast_dropout)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the masks SDPA gets: same numbers


@contextmanager
def fast_dropout(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``model``'s dropouts use :func:`keep_mask`; yields how many dropout
    sites were switched (0 when disabled or the model has no dropout)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    configs: list[tuple[object, str]] = []
    if enabled:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    fast = FastDropout(child.p)
                    fast.train(child.training)
                    setattr(parent, name, fast)
                    swapped.append((parent, name, child))
        configs = _switch_attention(model)
    try:
        yield len(swapped) + len(configs)
    finally:
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
        for config, implementation in configs:
            config._attn_implementation = implementation


def _switch_attention(model: nn.Module) -> list[tuple[object, str]]:
    """Point every SDPA config of ``model`` with attention dropout at our attention; returns
    (config, previous implementation) pairs to restore."""
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        dropout_p = max(float(getattr(config, key, 0.0) or 0.0)
                        for key in ("attention_probs_dropout_prob", "attention_dropout"))
        if getattr(config, "_attn_implementation", None) == "sdpa" and dropout_p > 0:
            out.append((config, "sdpa"))
            config._attn_implementation = ATTENTION_NAME
    return out
