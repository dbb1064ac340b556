"""``train.compile``: torch.compile (inductor) of every transformer block, and when ``auto``
turns it on.

Blocks, not the whole model: identical blocks share one compiled graph, the embedding and the
label-only LM head stay eager, and a graph break costs one block, not the step. Inductor fuses
the element-wise chains between matmuls (RMSNorm, RoPE, SwiGLU, residual adds, casts), which
in eager mode each read and write a full activation tensor.

Measured with benchmarks/train_levers.py (SmolLM2-135M, LoRA, 2 cores): on an AMD EPYC whose
bf16 matmuls are 4.5x its fp32 ones, compile took tokens/s from 487 to 637 (+31%) and peak RSS
from 3.4 to 2.5 GB, for a first step of ~30 s; on an Intel Xeon where fp32 wins, +6-12% for a
first step of 49 s (20 s with a warm cache); on an AVX2-only EPYC (fp32 only) +12-13% and peak
RSS 5.6-5.8 -> 3.8-3.9 GB, same losses, first step 36 s cold / 13 s warm. So ``auto`` compiles
where it pays, in either precision: a model on a CPU big enough for element-wise passes to
matter, a run long enough to repay the compile.
Inductor caches compiled graphs on disk (torch's default cache), so a second run with the same
shapes compiles much faster.

``auto`` decides in two parts. Up front, what needs no timing (device, model size, run
length, step size, a C++ compiler). Then the Trainer runs :data:`AUTO_MEASURE_STEPS` steps
eager and compiles for the rest only if the remaining steps at the measured eager pace would
take :data:`AUTO_MIN_SECONDS` or more (:func:`compile_pays`). An estimate from the measured
bf16 matmul peak flipped between runs on a 2-core AMX Xeon, whose bf16 peak samples ranged
519-1,440 GFLOP/s while eager steps ran at 23-60% of them; a real step's time does not move
that much.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import ModuleType

import torch
import torch._dynamo.config
import torch._functorch.config
from torch import nn

from peftlab.config import ConfigError, TrainConfig
from peftlab.models.unpadded_encoder import computes_real_tokens_only
from peftlab.runtime.fsdp import find_blocks

AUTO_MIN_PARAMS = 50_000_000  # tiny models: the compile costs more than it saves
AUTO_MIN_STEPS = 50  # ~30 s of compile repaid at ~1 s saved per SmolLM2 step
# Compiling costs 15 s (warm on-disk cache) to 60-75 s (cold) for SmolLM2 on 2 cores, more
# when batch lengths vary (a recompile per new shape until the shapes turn dynamic), and
# raised tokens/s by 31% on a bf16-fast EPYC and on an AMX Xeon by 51% in one A/B (-8% to
# +10% in noisier ones): at a ~25% saving a cold compile pays from ~3 minutes of eager steps.
AUTO_MIN_SECONDS = 180
AUTO_MIN_STEP_TOKENS = 1024  # measured gains are at 2k-token steps; small steps gain little
AUTO_MEASURE_STEPS = 2  # eager steps timed before deciding; the first one also warms up
FUNCTION_CACHE_FLAG = "autograd_cache_allow_custom_autograd_functions"
CHECKPOINT_SIDE_EFFECTS_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def resolve_compile(cfg: TrainConfig, model: nn.Module, total_steps: int,
                    tokens_per_step: float | None = None) -> tuple[bool | None, str]:
    """(compile?, why) for ``cfg.compile`` (true | false | auto) with ``cfg.precision`` resolved.

    ``None`` for ``auto`` when nothing up front rules compiling out: the caller times
    :data:`AUTO_MEASURE_STEPS` eager steps and asks :func:`compile_pays`.
    """
    if cfg.compile is not True and cfg.compile is not False:  # "auto"
        n_params = sum(p.numel() for p in model.parameters())
        devices = {p.device.type for p in model.parameters()}
        if cfg.distributed == "fsdp":
            return False, "off: not tried with train.distributed: fsdp"
        if devices != {"cpu"}:
            return False, f"off: measured on CPUs only, the model is on {sorted(devices)}"
        if computes_real_tokens_only(model):
            return False, (f"off: {type(model).__name__} computes its real tokens only "
                           "(models/unpadded_encoder.py), which compiled blocks would undo")
        if n_params < AUTO_MIN_PARAMS:
            return False, f"off: {n_params / 1e6:.0f}M parameters < {AUTO_MIN_PARAMS // 10**6}M"
        if total_steps < AUTO_MIN_STEPS:
            return False, f"off: {total_steps} steps < {AUTO_MIN_STEPS}"
        if tokens_per_step is not None and tokens_per_step < AUTO_MIN_STEP_TOKENS:
            return False, (f"off: ~{tokens_per_step:.0f} tokens per step < "
                           f"{AUTO_MIN_STEP_TOKENS} (small steps gain little and recompile "
                           "for new lengths)")
        if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "g++", "c++")):
            return False, "off: no C++ compiler found (inductor builds its CPU kernels with one)"
        return None, (f"decided after {AUTO_MEASURE_STEPS} eager steps ({cfg.precision}, "
                      f"{n_params / 1e6:.0f}M parameters, {total_steps} steps)")
    return cfg.compile, "on" if cfg.compile else "off"


def compile_pays(eager_step_seconds: float, remaining_steps: int) -> tuple[bool, str]:
    """The timed half of ``auto``: compile when the remaining steps at the measured eager
    pace take at least :data:`AUTO_MIN_SECONDS`."""
    eager_s = eager_step_seconds * remaining_steps
    on = eager_s >= AUTO_MIN_SECONDS
    return on, (f"{'on' if on else 'off'}: {remaining_steps} more steps at "
                f"{eager_step_seconds:.1f} s eager = {eager_s:.0f} s {'>=' if on else '<'} "
                f"{AUTO_MIN_SECONDS} s")


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


def _cacheable_autograd_functions() -> AbstractContextManager:
    """Let torch's on-disk AOTAutograd cache keep graphs that contain custom autograd Functions
    (LoRA's fused :class:`~peftlab.methods.lora._FusedLora`), which it bypasses by default.

    Why: a warm start then loads the traced forward/backward pair instead of re-tracing and
    re-partitioning it: SmolLM2's first compiled step took 16-18 s with a warm inductor cache,
    12 s with this (2-core AMX Xeon). Safe for our Functions: their forward and backward are
    traced into the graph the cache key hashes (so an edited Function misses the cache), and
    they hold no state outside their inputs. The flag is torch's (private, default off while
    upstream tests it); where a torch lacks it, nothing changes.
    """
    return _switched_on(torch._functorch.config, FUNCTION_CACHE_FLAG)


def _checkpointed_blocks_trace_whole() -> AbstractContextManager:
    """Let dynamo trace a checkpointed block as one graph although its forward has a side
    effect it will not replay when the backward recomputes the block.

    Why: transformers' attention sets and resets a context variable (the ``kernels`` hub
    layer) on every call; dynamo refuses to trace that inside ``torch.utils.checkpoint`` and
    broke the graph there, so under ``train.activation_checkpointing`` the blocks ran eager
    and compiling bought nothing. The set/reset pair leaves no state behind, so not replaying
    it is exact; random ops (dropout) are still replayed, by torch's functionalised RNG.
    Compiled and checkpointed, SmolLM2 shapes trained 9-11% faster at 2,048 tokens per step
    with 10-21% less peak RSS than checkpointed eager blocks (135M and 360M, fp32, AVX2 EPYC).
    """
    return _switched_on(torch._dynamo.config, CHECKPOINT_SIDE_EFFECTS_FLAG)


def _switched_on(config: ModuleType, flag: str) -> AbstractContextManager:
    """A torch config flag set to True inside the ``with``; nothing where this torch lacks it."""
    return config.patch(**{flag: True}) if hasattr(config, flag) else nullcontext()


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
        with _cacheable_autograd_functions(), _checkpointed_blocks_trace_whole():
            yield
    finally:
        for block in transformer_blocks(model):
            # nn.Module.compile() has no public inverse; it keeps the compiled call here
            block._compiled_call_impl = None
