"""Choosing and applying the training precision.

``bf16`` stores frozen weights in bf16 (no fp32 copy) and runs matmuls under bf16
autocast; trainable weights and optimizer state stay fp32. Whether that is faster
depends on the CPU: with AMX it is several times faster than fp32, but on CPUs whose
bf16 path is plain AVX-512 (seen on our own 2-core machine) fp32 matmuls win. ``auto``
measures a transformer-sized matmul in both dtypes once per process (best of a few
repeats, so a busy machine does not decide) and picks the faster. A CPU with no bf16
instructions at all (AVX2 only, e.g. a Zen 3 EPYC) has no oneDNN bf16 kernel: torch's fallback
ran bf16 matmuls at ~1 GFLOP/s there against fp32's ~130, so ``auto`` takes fp32 without
timing, and an explicit ``bf16`` is warned about.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from peftlab.config import PRECISIONS

logger = logging.getLogger(__name__)

_SHAPE = (512, 576, 1536)  # (tokens, in, out) of SmolLM2's MLP up-projection


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """oneDNN has a bf16 matmul kernel for this CPU (AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX).
    Without one, bf16 matmuls run in a reference loop two orders of magnitude slower."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None or not torch.backends.mkldnn.is_available():
        return True  # cannot tell: let the measurement decide
    return bool(check())


def matmul_gflops(repeats: int = 5, budget_s: float = 1.0,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best-of-``repeats`` GFLOP/s of a SmolLM2-MLP-sized matmul, per dtype.

    On a loaded machine a single sample can be slowed down arbitrarily by other processes,
    never sped up, so the fastest of several samples is the robust estimate. The dtypes are
    measured in turn (fp32, bf16, fp32, ...) so a burst of load hits both alike, and the
    loop stops early once ``budget_s`` is spent (a CPU with a very slow bf16 path).
    """
    m, k, n = _SHAPE
    mats = {name: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for a, b in mats.values():
        a @ b  # warm-up: first-call allocation and kernel selection
    best = dict.fromkeys(mats, 0.0)
    begin = clock()
    for _ in range(repeats):
        for name, (a, b) in mats.items():
            start = clock()
            a @ b
            end = clock()
            best[name] = max(best[name], 2 * m * k * n / max(end - start, 1e-9) / 1e9)
        if end - begin > budget_s:
            break
    return best


@functools.cache
def measured_matmul_gflops() -> dict[str, float]:
    """:func:`matmul_gflops`, measured once per process."""
    return matmul_gflops()


def choose_precision(gflops: dict[str, float]) -> str:
    """bf16 only when it is clearly (> 20%) faster: it also costs some accuracy."""
    return "bf16" if gflops["bf16"] > 1.2 * gflops["fp32"] else "fp32"


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU or when bf16 matmuls are clearly faster here, else ``fp32``."""
    on_gpu = torch.cuda.is_available()
    if precision == "bf16" and not on_gpu and not cpu_has_bf16_kernels():
        logger.warning("precision: bf16 on a CPU without bf16 instructions (no AVX512-BW or "
                       "AMX): bf16 matmuls run ~100x slower than fp32 here; set precision: "
                       "auto or fp32")
    if precision != "auto":
        return precision
    if on_gpu:
        return "bf16"
    if not cpu_has_bf16_kernels():
        return "fp32"
    return choose_precision(measured_matmul_gflops())


def prepare_precision(model: nn.Module, precision: str) -> None:
    """bf16: store frozen weights in bf16 (no fp32 copy); trainable weights stay fp32."""
    if precision == "bf16":
        _store_bf16(model, frozen_only=True)


def prepare_inference(model: nn.Module, precision: str) -> str:
    """Resolve ``precision`` for a model that only runs forward (serving, decoding) and,
    for bf16, store every floating weight in bf16; returns the resolved precision.

    Why: a decoding step reads every weight once to produce one token per row, so it is
    bound by memory traffic, and bf16 halves it -- on an AVX512-BF16 EPYC greedy decoding of
    SmolLM2-135M at batch 8 ran 2.4x faster than in fp32. Greedy tokens can differ from the
    fp32 ones (rounding). Buffers (RoPE frequencies) keep their dtype; tied weights stay tied.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    resolved = resolve_precision(precision)
    if resolved == "bf16":
        _store_bf16(model, frozen_only=False)
    return resolved


def _store_bf16(model: nn.Module, frozen_only: bool) -> None:
    """Floating parameters (only those without grad when ``frozen_only``) stored in bf16, in
    place: modules keep their parameter objects, so tied weights stay tied."""
    for param in model.parameters():
        if param.is_floating_point() and not (frozen_only and param.requires_grad):
            param.data = param.data.to(torch.bfloat16)


def autocast_for(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (matmuls in bf16, reductions in fp32), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
