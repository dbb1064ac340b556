"""LoRA (with rsLoRA and DoRA), written from scratch and saved in peft's on-disk format.

A target ``nn.Linear`` (or GPT-2's ``Conv1D``) is replaced in place by :class:`LoraLinear`,
which keeps the original module as ``base_layer`` and adds, per named adapter,

    y = base(x) + scaling * B(A(dropout(x)))                    (LoRA, scaling = alpha / r)
    y = m / ||W + scaling*BA||_row * (W + scaling*BA) x + b     (DoRA)

The module/parameter names match peft's (``q_proj.base_layer.weight``,
``q_proj.lora_A.<adapter>.weight``, ``q_proj.lora_magnitude_vector.<adapter>``) and the
files match ``PeftModel.save_pretrained``, so adapters move freely between peftlab and peft.
peft itself is only used by the tests, to prove numerical parity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftlab.config import ConfigError
from peftlab.methods import layers, peft_format
from peftlab.methods.lora_init import (
    BASE_CHANGING_INITS,
    as_plain_lora,
    check_rank,
    initial_factors,
    plain_alpha,
)
from peftlab.methods.registry import Method, register
from peftlab.models.targets import find_target_modules

INITS = ("kaiming", "gaussian", "random", *BASE_CHANGING_INITS)


@dataclass
class LoraConfig:
    """LoRA hyper-parameters (simple field types: the YAML loader coerces by type hints).

    init: "kaiming" (peft default: A kaiming-uniform, B zero, so the model is unchanged at
    step 0), "gaussian" (A ~ N(0, 1/r), B zero), "random" (B random too; for tests), or
    "pissa" / "olora": the adapter starts as W's principal singular / QR directions and the
    frozen base holds the residual (peftlab.methods.lora_init); such an adapter must be the
    only one on the model, and it is saved as a plain rank-2r LoRA of the original base.
    lora_plus_ratio: LoRA+ (Hayou et al. 2024): lora_B (and other 1-D trainable parameters,
    as in peft's ``create_loraplus_optimizer``) train at ``train.lr`` times this ratio.
    modules_to_save: extra modules (e.g. a fresh classifier head) trained in full and saved
    with the adapter, as in peft. They are trained in place, shared by all adapters, and
    ``disable_adapters`` does not undo them.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    layers_to_transform: list[int] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    lora_plus_ratio: float | None = None

    @property
    def scaling(self) -> float:
        # rsLoRA divides by sqrt(r) so the update's scale does not shrink as the rank grows.
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def validate(self, where: str) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{where}.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"{where}.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"{where}.init: {self.init!r} is not one of {list(INITS)}")
        if self.init in BASE_CHANGING_INITS and self.use_dora:
            raise ConfigError(f"{where}.init: {self.init!r} with use_dora is not supported (the "
                              "adapter could not be saved relative to the original base weight)")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            raise ConfigError(f"{where}.lora_plus_ratio must be > 0 (LoRA+ uses e.g. 16), "
                              f"got {self.lora_plus_ratio!r}")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules must not be empty")
        if self.layers_to_transform is not None and any(i < 0 for i in self.layers_to_transform):
            raise ConfigError(f"{where}.layers_to_transform must hold layer indices >= 0, "
                              f"got {self.layers_to_transform}")


def _addmm_in_place(out: Tensor, m1: Tensor, m2: Tensor, alpha: float) -> None:
    out.addmm_(m1, m2, alpha=alpha)


# ``peftlab::addmm_in_place``: ``out += alpha * m1 @ m2`` as one op that tracing keeps whole.
# Traced, ``out.addmm_`` turns into an out-of-place addmm that first copies ``out`` (a full
# projection output, 0.15-0.25 s per SmolLM2 step at 8 x 256); inductor re-places a mutating
# op whose input has no other use, so compiled blocks update in place as eager code does
# (steps 3-5% faster in an interleaved same-process A/B on a 2-core AMX Xeon).
# Defined with torch.library.Library, not custom_op: a call costs ~10 us, not ~55 us.
_LIBRARY = torch.library.Library("peftlab", "FRAGMENT")
_LIBRARY.define("addmm_in_place(Tensor(a!) out, Tensor m1, Tensor m2, float alpha) -> ()")
_LIBRARY.impl("addmm_in_place", _addmm_in_place, "CompositeExplicitAutograd")


def _add_matmul_(out: Tensor, m1: Tensor, m2: Tensor) -> None:
    """``out += m1 @ m2`` in place; the library op only where code is traced."""
    if torch.compiler.is_compiling():
        torch.ops.peftlab.addmm_in_place(out, m1, m2, 1.0)
    else:
        _addmm_in_place(out, m1, m2, 1.0)


class _FusedLora(torch.autograd.Function):
    """y = x W^T + b + scaling * (x_lora A^T) B^T for a *frozen* W, b in one autograd node.

    Against the module-by-module graph this needs no full-size add/scale/cast passes, saves
    only the LoRA input and the rank-r activation ``x_lora A^T``, and skips the input gradient
    (g W) when the input does not need it (e.g. the first block's projections). ``x_lora`` is
    None when it is ``x`` itself (no dropout). All tensors arrive in one dtype, autocast's
    when it is on.

    The small low-rank term is computed first and the base GEMM accumulates into it (addmm
    with beta = 1), so the sum is rounded once, from the GEMM's fp32 accumulator. Why: in
    bf16 the other order rounds ``x W^T`` first, and an update below half its ulp is lost:
    with freshly trained B (~1e-4) only ~24% of the update reached the output, and SFT losses
    after a few steps sat 0.005-0.015 above the fp32 run's (as for transformers+peft under
    autocast); now within ~0.003. The price: the big GEMM reads its output back (~0.4 ms per
    2,048 x 1,536 projection on a 2-core AMX Xeon). The input gradient keeps the cheaper order
    (base first): its low-rank part only reaches the gradients of earlier layers, and the
    other order changed no loss measurably while costing 0.1-1.3 ms per projection.
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_lora: Tensor | None, w_t: Tensor, bias: Tensor | None,
                a: Tensor, b: Tensor, scaling: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xl = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
        xa = xl @ a.T  # (tokens, r)
        xa_scaled = xa * scaling  # (tokens, r): cheap, and keeps xa for grad B
        out = xa_scaled @ b.T if bias is None else torch.addmm(bias, xa_scaled, b.T)
        _add_matmul_(out, x2, w_t)  # += x W^T: the big GEMM last, one rounding
        ctx.save_for_backward(xl, xa, w_t, a, b)
        ctx.scaling, ctx.separate_lora_input, ctx.shape = scaling, x_lora is not None, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xl, xa, w_t, a, b = ctx.saved_tensors
        need_x, need_xl, _, _, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_xl = grad_a = grad_b = None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        with torch.autocast(g.device.type, enabled=False):
            if need_x or need_xl or need_a:
                gb = (g @ b).mul_(ctx.scaling)  # scaling * g B: (tokens, r)
            if need_x:
                grad_x = g @ w_t.T
                if not ctx.separate_lora_input:
                    _add_matmul_(grad_x, gb, a)
                grad_x = grad_x.view(ctx.shape)
            if need_xl:
                grad_xl = (gb @ a).view(ctx.shape)
            if need_a:
                grad_a = gb.T @ xl
            if need_b:
                grad_b = (g.T @ xa).mul_(ctx.scaling)
        return grad_x, grad_xl, None, None, grad_a, grad_b, None


class LoraLinear(layers.Wrapper):
    """A Linear/Conv1D plus any number of named low-rank adapters, one of them active.

    The base module is kept as ``base_layer`` (frozen); each adapter owns
    ``lora_A[name]`` (in -> r), ``lora_B[name]`` (r -> out) and, for DoRA, a per-output-row
    magnitude ``lora_magnitude_vector[name]``. A PiSSA/OLoRA adapter (``residual_adapter``)
    rewrites the base weight as W - scaling * B0 A0 and keeps its initial factors as buffers
    ``residual_A``/``residual_B``: disabled, the layer adds them back and computes W x.

    Plain LoRA on a frozen base runs through :class:`_FusedLora` (set ``fused = False`` on a
    layer, or the class, to use the module-by-module path); DoRA always takes the latter.
    While a :class:`RowAdapters` is attached (serving), each batch row uses its own adapter
    instead of the active one.
    """

    fused: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"LoRA supports nn.Linear and Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        # Conv1D (GPT-2) stores its weight as (in, out), the transpose of nn.Linear's (out, in).
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = self.base_weight().shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self._merged_norm: Tensor | None = None  # DoRA: the norm used at merge time, to unmerge
        self.row_adapters: RowAdapters | None = None
        self._stacked: _Stacked | None = None  # this layer's share of row_adapters
        self.residual_adapter: str | None = None  # the PiSSA/OLoRA adapter that changed the base
        # buffers: they follow .to(), but are not parameters (never trained, never checkpointed)
        self.register_buffer("residual_A", None, persistent=False)
        self.register_buffer("residual_B", None, persistent=False)

    def base_weight(self) -> Tensor:
        """The base weight as (out, in), whatever the storage layout."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged_adapter is not None:
            raise RuntimeError("unmerge the model before adding an adapter")
        if self.residual_adapter is not None or (cfg.init in BASE_CHANGING_INITS and self.lora_A):
            raise ValueError("a PiSSA/OLoRA adapter changes the base weight, so it must be the "
                             "only adapter on its layers")
        w = self.base_layer.weight
        # Keep LoRA params in fp32 even on a bf16/fp16 base: they are the trained master copy.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        a = nn.Linear(self.in_features, cfg.r, bias=False, device=w.device, dtype=dtype)
        b = nn.Linear(cfg.r, self.out_features, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(a.weight, std=1 / cfg.r)
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            if cfg.init == "random":
                nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(b.weight)  # B = 0: the model is unchanged at step 0
            if cfg.init in BASE_CHANGING_INITS:
                self._init_from_base(name, cfg, a, b)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scaling
        self.configs[name] = cfg
        if cfg.use_dora:
            # m starts as ||W + scaling*BA|| per output row, so DoRA too starts at the base output
            # (or at plain LoRA's output when B is random).
            self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name).to(dtype))

    @torch.no_grad()
    def _init_from_base(self, name: str, cfg: LoraConfig, a: nn.Linear, b: nn.Linear) -> None:
        """PiSSA/OLoRA: A, B from the base weight; the base keeps W - scaling * B A."""
        a0, b0 = initial_factors(cfg.init, self.base_weight(), cfg.r, cfg.scaling)
        a.weight.copy_(a0)
        b.weight.copy_(b0)
        self._write_base_weight(self.base_weight().float() - cfg.scaling * (b0 @ a0))
        self.residual_A = a0.to(a.weight.dtype)
        self.residual_B = b0.to(b.weight.dtype)
        self.residual_adapter = name

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = [self.lora_A[name].weight, self.lora_B[name].weight]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    def delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A as (out, in), in fp32 (also under autocast)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.autocast(a.device.type, enabled=False):
            return (b.float() @ a.float()) * self.scaling[name]

    @torch.no_grad()
    def weight_norm(self, name: str) -> Tensor:
        """||W + scaling*BA|| per output row in fp32, detached as in the DoRA paper (sec. 4.3)."""
        with torch.autocast(self.base_layer.weight.device.type, enabled=False):
            return torch.linalg.norm(self.base_weight().float() + self.delta_weight(name), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.row_adapters is not None:
            return self._per_row_forward(x)
        name = self.active_adapter
        if self.disabled and self.merged_adapter is not None:
            raise RuntimeError("cannot disable a merged LoRA layer; unmerge it first")
        if name is None or self.disabled or self.merged_adapter is not None:
            result = self.base_layer(x)
            if self.residual_adapter is None or self.merged_adapter is not None:
                return result
            # the base holds W - s B0 A0: add the initial adapter back to compute W x
            a0, b0 = self.residual_A.to(x.dtype), self.residual_B.to(x.dtype)
            scaling = self.scaling[self.residual_adapter]
            return (result + F.linear(F.linear(x, a0), b0) * scaling).to(result.dtype)
        if name not in self.lora_magnitude_vector:
            dtype = self._fused_dtype(x)
            if dtype is not None:
                return self._fused_forward(x, name, dtype)
        result = self.base_layer(x)
        # Run the adapter in the input's dtype (fp32 master weights are cast, which autograd
        # handles); under autocast F.linear picks bf16 by itself.
        a = self.lora_A[name].weight.to(x.dtype)
        b = self.lora_B[name].weight.to(x.dtype)
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        if name not in self.lora_magnitude_vector:
            return (result + F.linear(F.linear(dropout(x), a), b) * scaling).to(result.dtype)

        # DoRA, in peft's form: W' x = (m/n) (W x + scaling * B A x), written as a correction on
        # top of the base output so the (possibly bf16) base matmul is reused.
        scale = (self.lora_magnitude_vector[name] / self.weight_norm(name)).view(1, -1)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_out = result if bias is None else result - bias
        else:
            x = dropout(x)  # with dropout, peft recomputes W x on the dropped-out input
            base_out = F.linear(x, self.base_weight().to(x.dtype))
        lora_out = F.linear(F.linear(x, a), b)
        return (result + (scale - 1) * base_out + scale * lora_out * scaling).to(result.dtype)

    def _fused_dtype(self, x: Tensor) -> torch.dtype | None:
        """The dtype the fused kernel would compute in, or None when it does not apply.

        It applies to a frozen, hook-free nn.Linear/Conv1D base whose weight dtype matches
        the computation (under autocast all operands are cast to the autocast dtype, exactly
        as F.linear would). Anything else (a trainable base, an unusual dtype) takes the
        plain path.
        """
        base = self.base_layer
        if not (self.fused and type(base) in (nn.Linear, Conv1D) and x.is_floating_point()):
            return None
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        device = x.device.type
        if torch.is_autocast_enabled(device):
            if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return None
            return torch.get_autocast_dtype(device)
        return x.dtype if base.weight.dtype == x.dtype else None

    def _fused_forward(self, x: Tensor, name: str, dtype: torch.dtype) -> Tensor:
        base = self.base_layer
        w = base.weight.to(dtype)
        w_t = w if self.fan_in_fan_out else w.T  # (in, out): Conv1D already stores W^T
        bias = None if base.bias is None else base.bias.to(dtype)
        dropout = self.lora_dropout[name]
        # Dropout only feeds A (as in peft): the dropped-out input is a second Function input
        # whose gradient autograd routes back through the dropout mask.
        x_lora = None
        if not isinstance(dropout, nn.Identity) and dropout.training:
            x_lora = dropout(x).to(dtype)
        a = self.lora_A[name].weight.to(dtype)  # fp32 master -> compute dtype (autograd casts back)
        b = self.lora_B[name].weight.to(dtype)
        # No autocast-off region around the call: every operand is already in autocast's dtype
        # (or autocast is off), so autocast would change nothing inside, and such a region in a
        # compiled block makes torch bypass its on-disk autograd cache (seconds per warm start).
        return _FusedLora.apply(x.to(dtype), x_lora, w_t, bias, a, b, self.scaling[name])

    def _per_row_forward(self, x: Tensor) -> Tensor:
        """Base output for the whole batch + each row's own low-rank update (one masked pass)."""
        result = self.base_layer(x)
        stacked = self._stacked
        mask = None if stacked is None else self.row_adapters.mask(stacked, x.shape[0])
        if mask is None:  # no row uses an adapter that covers this layer
            return result
        xa = F.linear(x, stacked.a) * mask.view(x.shape[0], *([1] * (x.ndim - 2)), -1)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]),
                          stacked.b_t)
        return out.view_as(result)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight (for inference; computed in fp32)."""
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return
        merged = self.base_weight().float() + self.delta_weight(name)
        if name in self.lora_magnitude_vector:
            self._merged_norm = torch.linalg.norm(merged, dim=1)
            merged = (self.lora_magnitude_vector[name].float() / self._merged_norm).view(-1, 1) * merged
        self._write_base_weight(merged)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (exact up to rounding in fp32; lossy if the base is bf16)."""
        name = self.merged_adapter
        if name is None:
            return
        weight = self.base_weight().float()
        if name in self.lora_magnitude_vector:
            weight = weight / (self.lora_magnitude_vector[name].float() / self._merged_norm).view(-1, 1)
            self._merged_norm = None
        self._write_base_weight(weight - self.delta_weight(name))
        self.merged_adapter = None

    def _write_base_weight(self, weight_out_in: Tensor) -> None:
        w = self.base_layer.weight
        w.copy_(weight_out_in.T if self.fan_in_fan_out else weight_out_in)

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, disabled={self.disabled}, merged={self.merged_adapter!r}"


# ----------------------------------------------------------------------------- mixed batches


@dataclass
class _Stacked:
    """One layer's adapters side by side: ``a`` (sum of ranks, in), ``b_t`` (sum of ranks, out)
    and, per rank column, the adapter slot it belongs to and that adapter's scaling."""

    a: Tensor
    b_t: Tensor
    column_slot: Tensor
    column_scaling: Tensor
    key: tuple[str, ...]  # the adapters this layer holds: layers alike share one mask


class RowAdapters:
    """Which adapter each row of a batch uses, so one forward serves many adapters.

    The S-LoRA/Punica idea in plain PyTorch: every LoRA layer computes the shared base matmul
    once for the whole batch, then the low-rank updates of all rows together. The A matrices
    of the adapters are stacked (x A_all^T: tokens x sum of ranks), each row's columns are
    kept for its own adapter only (a mask holding that adapter's scaling, 0 elsewhere) and
    the result goes through the stacked B matrices in one addmm. A row with no adapter (the
    base model) or an adapter that skips this layer gets an all-zero mask row. Ranks are
    small, so the masked-out work is a few columns, not a matmul per adapter.

    ``set_rows`` takes one adapter name (or None) per batch row before each forward.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._slot = {name: i + 1 for i, name in enumerate(self.names)}  # 0: no adapter
        self.slots = torch.zeros(0, dtype=torch.long)
        self._masks: dict[tuple[str, ...], Tensor | None] = {}

    def set_rows(self, adapters: list[str | None]) -> None:
        unknown = sorted({a for a in adapters if a is not None and a not in self._slot})
        if unknown:
            raise ValueError(f"adapters {unknown} are not among the batched ones {self.names}")
        self.slots = torch.tensor([0 if a is None else self._slot[a] for a in adapters],
                                  dtype=torch.long)
        self._masks = {}

    def mask(self, stacked: _Stacked, rows: int) -> Tensor | None:
        """(rows, sum of ranks): the scaling where a column is the row's adapter, else 0;
        None when no row uses any of the layer's adapters. Cached per adapter set and batch."""
        if rows != self.slots.numel():
            raise ValueError(f"the batch has {rows} rows but set_rows named {self.slots.numel()}")
        if stacked.key not in self._masks:
            slots = self.slots.to(stacked.column_slot.device)
            hit = slots[:, None] == stacked.column_slot[None, :]
            self._masks[stacked.key] = (hit * stacked.column_scaling).to(stacked.a.dtype) \
                if bool(hit.any()) else None
        return self._masks[stacked.key]


def _stack(layer: LoraLinear, route: RowAdapters) -> _Stacked | None:
    names = [n for n in route.names if n in layer.configs]
    if not names:
        return None
    dtype = layer.base_layer.weight.dtype
    with torch.no_grad():
        a = torch.cat([layer.lora_A[n].weight for n in names]).to(dtype)
        b_t = torch.cat([layer.lora_B[n].weight.T for n in names]).to(dtype)
    slot = torch.cat([torch.full((layer.configs[n].r,), route._slot[n]) for n in names])
    scaling = torch.cat([torch.full((layer.configs[n].r,), layer.scaling[n]) for n in names])
    return _Stacked(a, b_t, slot.to(a.device), scaling.to(a.device, torch.float32), tuple(names))


def attach_row_adapters(model: nn.Module, names: list[str]) -> RowAdapters:
    """Make every LoRA layer of ``model`` compute each batch row with its own adapter (from
    ``names``; a row may also use none) until :func:`detach_row_adapters`. For inference:
    the stacked weights are copies, so later training of the adapters does not reach them."""
    lora = _require_layers(model)
    known = adapter_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"adapters {missing} are not in the model; it has {known}")
    for name, layer in lora.items():
        if layer.merged_adapter is not None:
            raise RuntimeError(f"{name} is merged; unmerge the model before batching adapters")
        dora = [n for n in names if n in layer.lora_magnitude_vector]
        if dora:
            raise ValueError(f"adapter {dora[0]!r} is DoRA, whose per-row weight norm cannot "
                             "be batched with other adapters; merge it or serve it alone")
    route = RowAdapters(names)
    for layer in lora.values():
        layer.row_adapters, layer._stacked = route, _stack(layer, route)
    return route


def detach_row_adapters(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.row_adapters, layer._stacked = None, None


@contextmanager
def row_adapters(model: nn.Module, names: list[str]) -> Iterator[RowAdapters]:
    """:func:`attach_row_adapters` for the block."""
    route = attach_row_adapters(model, names)
    try:
        yield route
    finally:
        detach_row_adapters(model)


# ----------------------------------------------------------------------------- model level


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA-wrapped module, by full dotted name."""
    return layers.wrapper_layers(model, LoraLinear)


def adapter_names(model: nn.Module) -> list[str]:
    """Adapter names present in the model, in the order they were added."""
    return layers.adapter_names(lora_layers(model))


def apply_lora(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> None:
    """Wrap the target modules (or add an adapter to already wrapped ones), freeze the rest,
    and make ``adapter_name`` the active, trainable adapter."""
    cfg.validate("method")
    # find_target_modules returns a wrapped layer under its original name, so a second
    # adapter lands on the same modules (and never on the first one's lora_A/lora_B).
    targets = find_target_modules(model, cfg.target_modules, cfg.layers_to_transform)
    _inject(model, targets, cfg, adapter_name)
    set_adapter(model, adapter_name)


def _inject(model: nn.Module, targets: list[str], cfg: LoraConfig, adapter_name: str) -> None:
    existing = lora_layers(model)
    layers.check_new_adapter_name(existing, adapter_name)
    # fail before touching the model
    peft_format.check_targets_outside_saved(model, targets, cfg.modules_to_save)
    _check_base_changing(model, existing, targets, cfg)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            model.set_submodule(name, module)
        module.add_adapter(adapter_name, cfg)


def _check_base_changing(model: nn.Module, existing: dict[str, LoraLinear], targets: list[str],
                         cfg: LoraConfig) -> None:
    """A PiSSA/OLoRA adapter rewrites the shared base weight, so it must be the only adapter."""
    owner = next((layer.residual_adapter for layer in existing.values()
                  if layer.residual_adapter is not None), None)
    if owner is not None:
        raise ValueError(f"the model holds PiSSA/OLoRA adapter {owner!r}, which changed the base "
                         "weights; no other adapter can be added (load the saved adapter, a "
                         "plain LoRA, into a fresh model instead)")
    if cfg.init not in BASE_CHANGING_INITS:
        return
    if existing:
        raise ValueError(f"init {cfg.init!r} changes the base weights, so it must be the only "
                         f"adapter; the model already has {adapter_names(model)}")
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, (nn.Linear, Conv1D)):
            problem = check_rank(cfg.init, cfg.r, name, *_out_in(module))
            if problem:
                raise ConfigError(f"method.r: {problem}")


def _out_in(module: nn.Linear | Conv1D) -> tuple[int, int]:
    """(out, in) of a Linear or (GPT-2) Conv1D, whose weight is stored (in, out)."""
    out_features, in_features = module.weight.shape
    return (in_features, out_features) if isinstance(module, Conv1D) else (out_features, in_features)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter; only its parameters stay trainable."""
    layers.set_active(model, _require_layers(model), name)


def disable_adapters(model: nn.Module) -> AbstractContextManager[None]:
    """Inside the block the model computes the pure base output (e.g. a frozen reference
    policy for DPO/PPO) without copying it. Merged layers are unmerged and merged back."""
    return layers.disabled(_require_layers(model))


def merge(model: nn.Module) -> None:
    """Fold each layer's active adapter into its base weight (faster inference)."""
    layers.merge_all(_require_layers(model))


def unmerge(model: nn.Module) -> None:
    layers.unmerge_all(_require_layers(model))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and put plain base layers back: a normal transformers model."""
    return layers.replace_with_base(model, _require_layers(model))


def param_groups(model: nn.Module, cfg: LoraConfig) -> list[dict[str, Any]]:
    """Optimizer groups; with ``lora_plus_ratio``, LoRA+ by the rule of peft's
    ``create_loraplus_optimizer``: lora_B and every 1-D trainable parameter (DoRA magnitudes,
    biases and norms of modules_to_save) at lr x ratio -- without weight decay for biases and
    LayerNorm weights -- and the rest (lora_A, 2-D weights of modules_to_save) at lr."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.lora_plus_ratio is None:
        return [{"params": [p for _, p in params]}]
    modules = dict(model.named_modules())
    slow, fast, fast_no_decay = [], [], []
    for name, p in params:
        if "lora_B" in name or p.ndim == 1:
            owner = modules.get(name.rpartition(".")[0])
            no_decay = "bias" in name or isinstance(owner, nn.LayerNorm)
            (fast_no_decay if no_decay else fast).append(p)
        else:
            slow.append(p)
    ratio = cfg.lora_plus_ratio
    return [{"params": slow}, {"params": fast, "lr_scale": ratio},
            {"params": fast_no_decay, "lr_scale": ratio, "weight_decay": 0.0}]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _require_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return layers.require_layers(model, LoraLinear, "LoRA", "apply_lora")


# ----------------------------------------------------------------------------- peft format


def save_lora(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write ``adapter_name`` as a peft adapter (loadable by ``PeftModel.from_pretrained``)."""
    saved, cfg = layers.adapter_to_save(model, LoraLinear, adapter_name)
    prefix = peft_format.PREFIX
    tensors: dict[str, Tensor] = {}
    # PiSSA/OLoRA: written as the rank-2r plain LoRA relative to the original base weight
    to_plain = cfg.init in BASE_CHANGING_INITS
    for name, layer in saved.items():
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if to_plain:
            a, b = as_plain_lora(a.detach(), b.detach(), layer.residual_A, layer.residual_B)
        tensors[f"{prefix}{name}.lora_A.weight"] = a
        tensors[f"{prefix}{name}.lora_B.weight"] = b
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{prefix}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    tensors.update(peft_format.modules_to_save_tensors(model, cfg.modules_to_save))
    config = peft_format.peft_config_dict(
        r=2 * cfg.r if to_plain else cfg.r,
        alpha=plain_alpha(cfg.alpha, cfg.use_rslora) if to_plain else cfg.alpha,
        dropout=cfg.dropout,
        target_modules=list(saved),  # full names: unambiguous for peft and for us
        layers_to_transform=cfg.layers_to_transform,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init="kaiming" if to_plain else cfg.init,
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in saved.values()),
        modules_to_save=cfg.modules_to_save,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    peft_format.write_adapter(directory, config, tensors)


def load_lora(model: nn.Module, directory: str | PathLike, adapter_name: str = "default") -> LoraConfig:
    """Load a peft (or peftlab) LoRA adapter into ``model`` and make it active.

    The tensor file is the ground truth for which modules are adapted (peft's own matching
    rules have quirks); the config supplies r/alpha/rsLoRA/DoRA. Returns the adapter's config.
    """
    fields, config_path = peft_format.read_config(directory)
    tensors, weights_path = peft_format.read_weights(directory)

    per_module: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        parsed = peft_format.split_key(key)
        if parsed is None:
            extra[key] = tensor
        else:
            per_module.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not per_module:
        raise ValueError(f"{weights_path}: holds no LoRA tensors (keys like "
                         f"'{peft_format.PREFIX}<module>.lora_A.weight')")
    if fields["target_modules"] is None:
        fields["target_modules"] = sorted(per_module)
    cfg = LoraConfig(**fields)
    cfg.validate(str(config_path))

    modules = dict(model.named_modules())
    for name, kinds in per_module.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Conv1D, LoraLinear)):
            key = f"{peft_format.PREFIX}{name}.lora_A.weight"
            what = "no such module" if module is None else f"a {type(module).__name__}, not Linear/Conv1D"
            raise ValueError(f"{weights_path}: unexpected key {key!r}: {name!r} is {what} in this model")
        needed = ["lora_A", "lora_B"] + (["magnitude"] if cfg.use_dora else [])
        for kind in needed:
            if kind not in kinds:
                raise ValueError(f"{weights_path}: missing key {_key(name, kind)!r}")
        if "magnitude" in kinds and not cfg.use_dora:
            raise ValueError(f"{weights_path}: unexpected key {_key(name, 'magnitude')!r} "
                             f"({config_path} has use_dora false)")
    # Modules the config names by full path must have tensors (catches truncated files).
    if isinstance(cfg.target_modules, list):
        for name in cfg.target_modules:
            if isinstance(modules.get(name), (nn.Linear, Conv1D, LoraLinear)) and name not in per_module:
                raise ValueError(f"{weights_path}: missing key {_key(name, 'lora_A')!r} "
                                 f"(module listed in {config_path} target_modules)")
    pairs = peft_format.match_modules_to_save(model, cfg.modules_to_save, extra, weights_path,
                                              "a LoRA tensor of a Linear/Conv1D module")
    if cfg.init in BASE_CHANGING_INITS:
        cfg = _to_plain_lora(modules, per_module, cfg, weights_path)

    _inject(model, sorted(per_module), cfg, adapter_name)  # the init is overwritten just below
    with torch.no_grad():
        for name, kinds in per_module.items():
            layer = model.get_submodule(name)
            targets = {"lora_A": layer.lora_A[adapter_name].weight,
                       "lora_B": layer.lora_B[adapter_name].weight}
            if cfg.use_dora:
                targets["magnitude"] = layer.lora_magnitude_vector[adapter_name]
            for kind, param in targets.items():
                peft_format.copy_tensor(param, kinds[kind], _key(name, kind), weights_path)
        for param, tensor in pairs:
            param.copy_(tensor)
    set_adapter(model, adapter_name)
    return cfg


def _to_plain_lora(modules: dict[str, nn.Module], per_module: dict[str, dict[str, Tensor]],
                   cfg: LoraConfig, weights_path: PathLike) -> LoraConfig:
    """A peft PiSSA/OLoRA adapter saved unconverted holds A, B relative to the residual peft
    computes from the base at load time; compute the same initial factors from this (original)
    base and load ``[A; A0], [B | -B0]``, a plain LoRA on the unmodified base (in place)."""
    for name, kinds in per_module.items():
        module = modules[name]
        base = module.base_layer if isinstance(module, LoraLinear) else module
        out_features, in_features = _out_in(base)
        problem = check_rank(cfg.init, cfg.r, name, out_features, in_features)
        if problem:
            raise ValueError(f"{weights_path}: {problem}")
        for kind, shape in (("lora_A", (cfg.r, in_features)), ("lora_B", (out_features, cfg.r))):
            if tuple(kinds[kind].shape) != shape:
                raise ValueError(f"{weights_path}: key {_key(name, kind)!r} has shape "
                                 f"{tuple(kinds[kind].shape)}, the model expects {shape}")
        weight = base.weight.T if isinstance(base, Conv1D) else base.weight
        a0, b0 = initial_factors(cfg.init, weight, cfg.r, cfg.scaling)
        kinds["lora_A"], kinds["lora_B"] = as_plain_lora(kinds["lora_A"].float(),
                                                         kinds["lora_B"].float(), a0, b0)
    return replace(cfg, r=2 * cfg.r, alpha=plain_alpha(cfg.alpha, cfg.use_rslora),
                   init="kaiming")


def _key(module: str, kind: str) -> str:
    suffix = {v: k for k, v in peft_format.TENSOR_KINDS.items()}[kind]
    return f"{peft_format.PREFIX}{module}{suffix}"


register(Method(name="lora", config_cls=LoraConfig, apply=apply_lora, save=save_lora,
                load=load_lora, peft_type="LORA",
                present=lambda m: bool(lora_layers(m)), merge=merge_and_unload,
                disable=disable_adapters, param_groups=param_groups))
