"""Attention for training on a CPU: SDPA's flash kernel or a grouped matmul-softmax-matmul,
whichever this CPU runs faster for the shape, measured the first time a shape is seen.

Why: on a 2-core AVX512-BF16 EPYC, SDPA's CPU flash kernel (causal, GQA) took 48 ms forward
plus backward for SmolLM2's attention at 8 x 256 tokens in bf16, the plain sequence
``softmax(q k^T) v`` 27 ms: at short sequences the flash kernel's blocking and recomputation
cost more than the S x S probabilities it avoids. At 1,024 tokens the flash kernel wins
(0.6x the time), and the probabilities saved for backward grow as S^2, so the grouped path
is only considered up to :data:`MAX_GROUPED_LEN` keys. ``precision: auto`` measures matmuls
once per process for the same reason: which is faster differs between CPUs.

The grouped path never copies keys and values per query head (what ``repeat_kv`` does): the
query heads sharing a key head are stacked along the sequence axis, ``(B, KV, G*S, D)``, so
each key head meets its G query heads in one matmul. With a dropout probability it drops
out the probabilities with :func:`~peftlab.runtime.fast_dropout.apply_dropout` (torch's
per-element Bernoulli draws made a third of a MiniLM step).

Inside :func:`cpu_attention` (the Trainer opens it while it trains on a CPU) every SDPA
config of the model points at :func:`attention_forward`, registered with transformers'
``AttentionInterface``; on leaving the model's own implementation comes back, so what is
saved, merged or served is the model as loaded.

Compiled blocks (``train.compile``) choose too: inductor does not fuse attention of its own on
a CPU, it calls the same SDPA flash kernel, and its backward was ~38% of a compiled SmolLM2
step on a 2-core AMX Xeon. The timing cannot run inside a traced block, so with
``compiled=True`` a pre-hook on the module that owns the blocks (it runs eager) times the
batch's shape and leaves the answer where the traced code reads it as a constant
(:data:`_TRACED_CHOICE`; a different answer for a later length recompiles the blocks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from peftlab.runtime.fast_dropout import apply_dropout
from peftlab.runtime.fsdp import find_blocks

ATTENTION_NAME = "peftlab_cpu_attention"
MAX_GROUPED_LEN = 1024  # beyond, flash wins on the CPUs we measured, and S^2 memory grows
_TOKENS_TO_TIME = 2048  # batch x length of the timed shape: long enough to time, short to run

# (dtype, heads, key heads, head dim, length bucket) -> grouped is faster (forward + backward)
_CHOICES: dict[tuple, bool] = {}
# (heads, key heads, head dim) -> the choice for the batch now running, read by traced blocks
_TRACED_CHOICE: dict[tuple[int, int, int], bool] = {}


def grouped_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None,
                      scale: float | None = None, causal: bool = False,
                      dropout: float = 0.0) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for query ``(B, H, S, D)`` and key/value
    ``(B, KV, L, D)`` with ``H = KV * G`` (query head h reads key head h // G, as in
    transformers' ``repeat_kv``). ``mask``: bool (True = attend) or additive float,
    broadcastable to ``(B, H, S, L)``; ``causal`` applies only without a mask. Returns
    ``(B, S, H, D)``, the layout transformers' attention functions return.

    The softmax runs in the scores' dtype (its kernel accumulates in fp32 and rounds once);
    under autocast it would write fp32 probabilities and cast them back for the matmul.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    compiling = torch.compiler.is_compiling()
    scale = dim ** -0.5 if scale is None else scale
    # Out of place from here on: an in-place op on the view of the matmul's output makes
    # autograd clone and copy back the whole S x S scores in backward (CopySlices), twice per
    # layer. The scale goes on the queries (D wide, not L).
    stacked = (query * scale).reshape(batch * kv_heads, groups * q_len, dim)
    keys_t = key.reshape(batch * kv_heads, kv_len, dim).transpose(-1, -2)
    if mask is None and causal and q_len > 1:
        # The triangle enters as the matmul's input (beta = 1), one (G*S, L) slab for every
        # key head. Added to the scores instead, eager code paid a full S x S pass, and in a
        # compiled block its row pattern split inductor's fused softmax into two loops with
        # an fp32 copy of exp(scores) between them (10 ms per SmolLM2 layer at 8 x 256, bf16,
        # AMX Xeon; 6 ms now). Steps: compiled 4.4-4.7 s vs 4.9-5.4 s, eager -8%.
        future = torch.full((q_len, kv_len), float("-inf"), dtype=_matmul_dtype(query.dtype),
                            device=query.device).triu(kv_len - q_len + 1)
        scores = torch.baddbmm(future.repeat(groups, 1), stacked, keys_t)
    else:
        scores = torch.bmm(stacked, keys_t)
    scores = scores.view(batch, kv_heads, groups, q_len, kv_len)
    softmax = torch.softmax
    # Masks are added as 0 / -inf biases, not applied with masked_fill: the same scores, but
    # masked_fill on the S x S scores cost a clone plus a slow broadcast pass forward and
    # again backward (7 ms each per SmolLM2 layer at 8 x 256, bf16), an add 2 ms and nothing
    # backward. The gradient is unchanged: softmax's backward is zero where it output zero.
    if mask is not None:
        mask = _grouped_mask(mask, kv_heads, groups)[..., :kv_len]
        if mask.dtype == torch.bool:
            # traced code cannot branch on the data: it always takes the safe softmax
            if compiling or not bool(mask.any(-1).all()):
                # a query with no key to attend (left padding) gets zeros, as from SDPA;
                # only then: the safe softmax took 3x the plain one on MiniLM's scores
                softmax = _safe_softmax
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf"))
        scores = scores + mask.to(scores.dtype)
    # CPU autocast leaves softmax's dtype alone, and an autocast-off region in a compiled block
    # would make torch skip its on-disk autograd cache: only other devices need one
    device = query.device.type
    with nullcontext() if device == "cpu" else torch.autocast(device, enabled=False):
        probs = softmax(scores.to(value.dtype), dim=-1)
    probs = apply_dropout(probs, dropout)
    out = torch.bmm(probs.view(batch * kv_heads, groups * q_len, kv_len),
                    value.reshape(batch * kv_heads, kv_len, -1))
    return out.view(batch, heads, q_len, -1).transpose(1, 2).contiguous()


def _safe_softmax(scores: Tensor, dim: int) -> Tensor:
    """Softmax whose rows of only -inf are zeros (SDPA's math path calls the same op)."""
    return torch.ops.aten._safe_softmax(scores, dim)


def _grouped_mask(mask: Tensor, kv_heads: int, groups: int) -> Tensor:
    """A ``(B|1, 1|H, S, L)`` mask as ``(B|1, 1|KV, 1|G, S, L)``, matching the grouped scores."""
    if mask.dim() == 2:  # (S, L)
        return mask
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.reshape(mask.shape[0], kv_heads, groups, *mask.shape[-2:])


def _length_bucket(length: int) -> int:
    """The power of two at or above ``length`` (timed once, used for every length up to it)."""
    return 1 << max(length - 1, 1).bit_length()


def grouped_is_faster(query: Tensor, key: Tensor, repeats: int = 3) -> bool:
    """Whether :func:`grouped_attention` beats SDPA (causal) here for shapes like these,
    forward plus backward, timed once per (dtype, heads, key heads, head dim, length bucket)
    in this process on random inputs, best of ``repeats`` taken in turn (a burst of load hits
    both). Not per grad mode: under activation checkpointing the forward may run without
    grad and its recomputation with it, and both must take the same path.

    The dtype is the one the matmuls run in: under CPU autocast its dtype (Llama's RoPE
    hands over fp32 queries and keys, which autocast casts to bf16 for either kernel)."""
    heads, dim, kv_heads = query.shape[1], query.shape[-1], key.shape[1]
    return _choice(_matmul_dtype(query.dtype), heads, kv_heads, dim, key.shape[2], repeats)


def _matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled("cpu") and dtype in (torch.float32, torch.bfloat16):
        return torch.get_autocast_dtype("cpu")
    return dtype


def _choice(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, length: int,
            repeats: int = 3) -> bool:
    signature = (dtype, heads, kv_heads, dim, _length_bucket(length))
    if signature not in _CHOICES:
        _CHOICES[signature] = _time_grouped_vs_sdpa(*signature, repeats)
    return _CHOICES[signature]


def _time_grouped_vs_sdpa(dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
                          length: int, repeats: int) -> bool:
    batch = max(1, _TOKENS_TO_TIME // length)
    # a generator of its own: timing must not move the training's random stream (dropout
    # masks after a resume would differ from a straight run's)
    rng = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=rng).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=rng).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=rng).to(dtype)
    groups = heads // kv_heads

    # SDPA as transformers calls it for an unmasked causal batch: GQA inside the kernel
    candidates = {"sdpa": lambda q, k, v: nn.functional.scaled_dot_product_attention(
                      q, k, v, is_causal=True, enable_gqa=groups > 1).transpose(1, 2).contiguous(),
                  "grouped": lambda q, k, v: grouped_attention(q, k, v, causal=True)}
    best = dict.fromkeys(candidates, float("inf"))
    # identity saved-tensor hooks: when the first forward that meets this shape runs under
    # activation checkpointing, what the timing saves must not be counted as the block's
    with torch.enable_grad(), torch.autocast("cpu", enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for step in range(repeats + 1):  # the first round warms up and is not counted
            for name, run in candidates.items():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                start = time.perf_counter()
                run(*leaves).sum().backward()
                if step:
                    best[name] = min(best[name], time.perf_counter() - start)
    return best["grouped"] < 0.9 * best["sdpa"]  # clearly faster, or keep torch's kernel


def choices_state() -> list[list]:
    """The choices so far as JSON, for a checkpoint: a resumed run must use the kernels its
    first part used (the two differ in rounding, and a timing under other load may differ)."""
    return [[str(dtype).removeprefix("torch."), heads, kv_heads, dim, length, grouped]
            for (dtype, heads, kv_heads, dim, length), grouped in _CHOICES.items()]


def restore_choices(state: list[list]) -> None:
    """Take the choices of :func:`choices_state` (a checkpoint's) instead of timing them.
    An entry that does not read (a hand-edited state) is skipped: that shape is timed again."""
    for entry in state if isinstance(state, list) else []:
        try:
            dtype, heads, kv_heads, dim, length, grouped = entry
            key = (getattr(torch, str(dtype)), int(heads), int(kv_heads), int(dim), int(length))
        except (TypeError, ValueError, AttributeError):
            continue
        if isinstance(key[0], torch.dtype):
            _CHOICES[key] = bool(grouped)


def measured_choices() -> dict[str, str]:
    """What was chosen so far, for reports: ``"bf16 h9/3 d64 len256" -> "grouped"``."""
    out = {}
    for dtype, heads, kv_heads, dim, length, grouped in choices_state():
        name = dtype.replace("bfloat16", "bf16").replace("float32", "fp32")
        out[f"{name} h{heads}/{kv_heads} d{dim} len{length}"] = "grouped" if grouped else "sdpa"
    return out


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract. On a CPU, without a KV cache, up to
    :data:`MAX_GROUPED_LEN` keys: :func:`grouped_attention` when it was measured faster or
    when there is a dropout probability; otherwise transformers' own SDPA call."""
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap"))
    q_len, kv_len = query.shape[2], key.shape[2]
    plain = (query.device.type != "cpu" or special or q_len != kv_len
             or kv_len > MAX_GROUPED_LEN or kwargs.get("output_attentions"))
    if torch.compiler.is_compiling():  # the choice made before the block ran; with a
        # dropout probability SDPA's own (inductor traces its random numbers, not ours)
        grouped = dropout == 0.0 and _TRACED_CHOICE.get(
            (query.shape[1], key.shape[1], query.shape[-1]), False)
    else:
        grouped = not plain and (dropout > 0.0 or grouped_is_faster(query, key))
    if not plain and grouped:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return grouped_attention(query, key, value, attention_mask, scaling,
                                 causal=bool(causal) and attention_mask is None,
                                 dropout=dropout), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


AttentionInterface.register(ATTENTION_NAME, attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the masks SDPA gets: same numbers


def _time_before_traced_blocks(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the (eager) module that owns compiled blocks: time this batch's
    attention shape here, where timing can run, for the traced blocks to read."""
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    config = getattr(module, "config", None)
    if not isinstance(inputs, Tensor) or inputs.dim() < 2 or config is None:
        return
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    length = inputs.shape[1]
    dtype = _matmul_dtype(next(module.parameters()).dtype)
    grouped = length <= MAX_GROUPED_LEN and _choice(dtype, heads, kv_heads, dim, length)
    _TRACED_CHOICE[(heads, kv_heads, dim)] = grouped


def _blocks_owner(model: nn.Module) -> nn.Module | None:
    blocks = find_blocks(model)
    for module in model.modules():
        if any(child is blocks for child in module.children()):
            return module
    return None


@contextmanager
def cpu_attention(model: nn.Module, enabled: bool = True,
                  compiled: bool = False) -> Iterator[int]:
    """Inside the block every SDPA config of ``model`` uses :func:`attention_forward`;
    yields how many configs were switched (0 when disabled). ``compiled``: the transformer
    blocks will run compiled, so the kernel is chosen before they run (see the module's
    docstring)."""
    switched: list[object] = []
    hook = None
    if enabled:
        seen: set[int] = set()
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is None or id(config) in seen:
                continue
            seen.add(id(config))
            if getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = ATTENTION_NAME
                switched.append(config)
        owner = _blocks_owner(model) if compiled and switched else None
        if owner is not None:
            hook = owner.register_forward_pre_hook(_time_before_traced_blocks, with_kwargs=True)
    try:
        yield len(switched)
    finally:
        if hook is not None:
            hook.remove()
        _TRACED_CHOICE.clear()
        for config in switched:
            config._attn_implementation = "sdpa"
