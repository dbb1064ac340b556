"""Frozen linear layers run through oneDNN with their weights packed once, for decoding on a CPU.

Why: a decoding step multiplies a few rows by every weight matrix, so it is bound by reading
the weights, and ``F.linear`` re-arranges (packs) each weight into the matmul kernel's
blocked layout on every call. Packed once up front, the same product streams the weight
as stored: SmolLM2's 576 -> 1,536 projection at 8 rows, weights read from DRAM (2-core
EPYC), 134-165 -> 71-86 us in bf16 and 414-459 -> 101-133 us in fp32; greedy decoding of
SmolLM2-135M at batch 8 in bf16 120 -> 141 tokens/s, the same tokens (bf16 products are
bit-identical; fp32 ones differ from MKL's in the last bits, ~1e-4).

Inside :func:`packed_linears` every ``nn.Linear`` of the model on the CPU is swapped
for a :class:`PackedLinear` that holds the original parameters (state dicts, tied weights and
code reading ``.weight`` see no change) plus the packed copy, which costs the weights' size
again while the block is open. On leaving, the original modules come back. Anything that
needs a gradient, another device or another dtype takes ``F.linear`` as before; layers of a
dtype this CPU's oneDNN will not pack (bf16 on an AVX2-only CPU, see :func:`packs`) stay as
they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.runtime.module_swap import swapped_modules

PACKED_DTYPES = (torch.bfloat16, torch.float32)


def packing_available() -> bool:
    """oneDNN's linear ops are in this torch build (CPU wheels have them)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_linear_pointwise")


@cache
def packs(dtype: torch.dtype) -> bool:
    """oneDNN packs weights of ``dtype`` on this CPU. Why ask: its bf16 path needs AVX512-BW/VL/DQ
    or AVX-NE-CONVERT (an AVX2-only EPYC refuses it), and refusing costs an exception per layer."""
    if dtype not in PACKED_DTYPES or not packing_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """``nn.Linear`` whose forward, where no gradient is needed, uses a weight packed once."""

    def __init__(self, linear: nn.Linear, packed: Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects
        self.packed = packed

    def forward(self, x: Tensor) -> Tensor:
        if (x.dtype != self.packed.dtype or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed,
                                                 self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def _pack(linear: nn.Linear) -> Tensor | None:
    weight = linear.weight
    if (weight.device.type != "cpu" or not packs(weight.dtype)
            or (linear.bias is not None and linear.bias.dtype != weight.dtype)
            or linear._forward_hooks or linear._forward_pre_hooks):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except RuntimeError:  # a shape or dtype this oneDNN build does not pack
        return None


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block every CPU ``nn.Linear`` of ``model`` (exactly that type, no hooks)
    runs packed where no gradient is asked for; yields how many were swapped (0 when disabled
    or unavailable). The packed copies are taken on entry: weights must not change inside."""

    def replacement(child: nn.Module) -> nn.Module | None:
        if not enabled or type(child) is not nn.Linear:
            return None
        with torch.no_grad():
            packed = _pack(child)
        return None if packed is None else PackedLinear(child, packed)

    with swapped_modules(model, replacement) as count:
        yield count
