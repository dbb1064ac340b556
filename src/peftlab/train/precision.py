"""Choosing and applying the training precision.

``bf16`` stores frozen weights in bf16 (no fp32 copy) and runs matmuls under bf16
autocast; trainable weights and optimizer state stay fp32. Whether that is faster
depends on the CPU: with AMX it is several times faster than fp32, but on CPUs whose
bf16 path is plain AVX-512 (seen on our own 2-core machine) fp32 matmuls win. ``auto``
measures a transformer-sized matmul in both dtypes once per process and picks the faster.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

PRECISIONS = ["auto", "bf16", "fp32"]


@functools.cache
def measured_matmul_gflops() -> dict[str, float]:
    """GFLOP/s of a (512x576)@(576x1536) matmul — SmolLM2's MLP shape — per dtype."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(512, 576, dtype=dtype)
        b = torch.randn(576, 1536, dtype=dtype)
        for _ in range(2):
            a @ b
        reps, start = 8, time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = (time.perf_counter() - start) / reps
        out[name] = 2 * 512 * 576 * 1536 / seconds / 1e9
    return out


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU or when bf16 matmuls are clearly faster here, else ``fp32``."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16"
    rates = measured_matmul_gflops()
    return "bf16" if rates["bf16"] > 1.2 * rates["fp32"] else "fp32"


def prepare_precision(model: nn.Module, precision: str) -> None:
    """bf16: store frozen weights in bf16 (no fp32 copy); trainable weights stay fp32."""
    if precision != "bf16":
        return
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
