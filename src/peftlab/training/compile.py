"""``train.compile``: torch.compile (inductor) of every transformer block, and when ``auto``
turns it on.

Blocks, not the whole model: identical blocks share one compiled graph, the embedding and the
label-only LM head stay eager, and a graph break costs one block, not the step. Inductor fuses
the element-wise chains between matmuls (RMSNorm, RoPE, SwiGLU, residual adds, casts), which
in eager mode each read and write a full activation tensor.

Measured with benchmarks/train_levers.py (SmolLM2-135M, LoRA, 2 cores): on an AMD EPYC whose
bf16 matmuls are 4.5x its fp32 ones, compile took tokens/s from 487 to 637 (+31%) and peak RSS
from 3.4 to 2.5 GB, for a first step of ~30 s; on an Intel Xeon where fp32 wins, +6-12% for a
first step of 49 s (20 s with a warm cache). So ``auto`` compiles where it pays: bf16 on a CPU,
a model big enough for element-wise passes to matter, a run long enough to repay the compile.
Inductor caches compiled graphs on disk (torch's default cache), so a second run with the same
shapes compiles much faster.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from peftlab.config import ConfigError, TrainConfig
from peftlab.runtime.fsdp import find_blocks
from peftlab.runtime.precision import measured_matmul_gflops

AUTO_MIN_PARAMS = 50_000_000  # tiny models: the compile costs more than it saves
AUTO_MIN_STEPS = 50  # ~30 s of compile repaid at ~1 s saved per SmolLM2 step
# Compiling costs 30-60 s (more when batch lengths vary: a recompile per new shape until the
# shapes turn dynamic) and saves ~25% of eager time, so it pays from ~4 minutes of training.
AUTO_MIN_SECONDS = 240
AUTO_MIN_STEP_TOKENS = 1024  # measured gains are at 2k-token steps; small steps gain little
EAGER_EFFICIENCY = 0.4  # eager steps run at ~35-45% of the bf16 matmul peak (6N FLOPs/token)


def resolve_compile(cfg: TrainConfig, model: nn.Module, total_steps: int,
                    tokens_per_step: float | None = None) -> tuple[bool, str]:
    """(compile?, why) for ``cfg.compile`` (true | false | auto) with ``cfg.precision`` resolved.

    ``tokens_per_step`` (when known) estimates the eager training time from the measured bf16
    matmul rate; a run shorter than :data:`AUTO_MIN_SECONDS` stays eager.
    """
    if cfg.compile is not True and cfg.compile is not False:  # "auto"
        n_params = sum(p.numel() for p in model.parameters())
        devices = {p.device.type for p in model.parameters()}
        if cfg.activation_checkpointing:
            return False, "off: activation_checkpointing is on"
        if cfg.distributed == "fsdp":
            return False, "off: not tried with train.distributed: fsdp"
        if devices != {"cpu"}:
            return False, f"off: measured on CPUs only, the model is on {sorted(devices)}"
        if cfg.precision != "bf16":
            return False, f"off: precision {cfg.precision} (compile gains 6-12% there)"
        if n_params < AUTO_MIN_PARAMS:
            return False, f"off: {n_params / 1e6:.0f}M parameters < {AUTO_MIN_PARAMS // 10**6}M"
        if total_steps < AUTO_MIN_STEPS:
            return False, f"off: {total_steps} steps < {AUTO_MIN_STEPS}"
        if tokens_per_step is not None and tokens_per_step < AUTO_MIN_STEP_TOKENS:
            return False, (f"off: ~{tokens_per_step:.0f} tokens per step < "
                           f"{AUTO_MIN_STEP_TOKENS} (small steps gain little and recompile "
                           "for new lengths)")
        if tokens_per_step is not None:
            flops = 6 * n_params * tokens_per_step * total_steps
            eager_s = flops / (measured_matmul_gflops()["bf16"] * 1e9 * EAGER_EFFICIENCY)
            if eager_s < AUTO_MIN_SECONDS:
                return False, (f"off: ~{eager_s:.0f} s of eager training estimated, < "
                               f"{AUTO_MIN_SECONDS} s (the compile would not pay back)")
        if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "g++", "c++")):
            return False, "off: no C++ compiler found (inductor builds its CPU kernels with one)"
        return True, (f"on: bf16, {n_params / 1e6:.0f}M parameters, {total_steps} steps "
                      "(the first step compiles)")
    return cfg.compile, "on" if cfg.compile else "off"


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """:func:`peftlab.runtime.fsdp.find_blocks`, or an error saying compile cannot apply."""
    blocks = find_blocks(model)
    if blocks is None:
        raise ConfigError(f"train.compile: cannot find the transformer blocks of "
                          f"{type(model).__name__} (a ModuleList named layers/layer/h/blocks); "
                          "set it to false")
    return blocks


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every transformer block in place (inductor); returns the count."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


@contextmanager
def compiled_blocks(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Blocks compiled inside the ``with``, eager again after it.

    Training shapes repeat; generation after training (KV cache, one new token per call,
    growing lengths) would recompile for many shapes, so the model leaves ``fit`` eager.
    """
    if not enabled:
        yield
        return
    compile_blocks(model)
    try:
        yield
    finally:
        for block in transformer_blocks(model):
            # nn.Module.compile() has no public inverse; it keeps the compiled call here
            block._compiled_call_impl = None
