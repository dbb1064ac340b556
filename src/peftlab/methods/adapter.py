"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), written from scratch.

A block's attention-output and/or FFN-output projection is replaced in place by
:class:`AdapterLayer`, which keeps the original as ``base_layer`` and adds, per named adapter,

    h = base(x)
    y = h + up(act(down(h)))          (residual=True; residual=False drops the "h +")

with ``down``: hidden -> hidden // reduction_factor and ``up`` back, both with bias. The
adapter sits on the projection's output, i.e. before the block's dropout + residual add (+
LayerNorm for BERT), where Houlsby's paper puts it.

variant "houlsby": after the attention output and after the FFN (2 adapters per block);
variant "pfeiffer": after the FFN only (1 per block). Wrapped modules, per architecture:

    Llama / Qwen / Mistral / SmolLM2   self_attn.o_proj           mlp.down_proj
    GPT-2                              attn.c_proj                mlp.c_proj
    BERT / RoBERTa                     attention.output.dense     output.dense

Any other block layout is a clear error. init "near_zero" (default): down ~ N(0, 0.01^2), up
and both biases zero, so the model is exactly unchanged at step 0 (with residual=True);
"random" keeps nn.Linear's default init for both (the model changes; for tests).

On-disk format (peftlab's own, laid out like peft's), in the adapter directory:

* ``adapter_config.json``: ``{"peft_type": "PEFTLAB_ADAPTER", "variant", "reduction_factor",
  "non_linearity", "residual", "init", "layers_to_transform", "target_modules" (the wrapped
  modules' full names, informational), "base_model_name_or_path", "task_type"}``;
  ``method_for_adapter_dir`` picks ``adapter`` by that peft_type.
* ``adapter_model.safetensors``: per wrapped module ``<m>`` four tensors, the adapter name
  dropped as in peft: ``base_model.model.<m>.adapter_down.weight`` (bottleneck, hidden),
  ``...adapter_down.bias`` (bottleneck,), ``...adapter_up.weight`` (hidden, bottleneck),
  ``...adapter_up.bias`` (hidden,). Loading requires exactly the keys the config produces
  on the given model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftlab.config import ConfigError, suggest
from peftlab.methods import layers, peft_format
from peftlab.methods.registry import Method, register
from peftlab.models.targets import block_index

PEFT_TYPE = "PEFTLAB_ADAPTER"
VARIANTS = ("houlsby", "pfeiffer")
INITS = ("near_zero", "random")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
}
# Block-relative (attention output, FFN output) per architecture family; first match wins.
LAYOUTS: dict[str, tuple[str, str]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "bert": ("attention.output.dense", "output.dense"),
}
_KINDS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


@dataclass
class AdapterConfig:
    """Bottleneck adapter hyper-parameters (see the module docstring)."""

    variant: str = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    residual: bool = True
    init: str = "near_zero"
    layers_to_transform: list[int] | None = None

    def validate(self, where: str) -> None:
        _choice(f"{where}.variant", self.variant, VARIANTS)
        _choice(f"{where}.non_linearity", self.non_linearity, tuple(ACTIVATIONS))
        _choice(f"{where}.init", self.init, INITS)
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
            raise ConfigError(f"{where}.reduction_factor must be an integer >= 1, got {rf!r}")
        if not isinstance(self.residual, bool):
            raise ConfigError(f"{where}.residual must be true or false, got {self.residual!r}")
        idx = self.layers_to_transform
        if idx is not None and not (
            isinstance(idx, list) and idx
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx)
        ):
            raise ConfigError(f"{where}.layers_to_transform must be a non-empty list of layer "
                              f"indices >= 0, got {idx!r}")


def _choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}"
                          f"{suggest(str(value), list(choices))}")


def output_size(module: nn.Module) -> int:
    """The output width of a (possibly adapter-wrapped) Linear/Conv1D."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    raise TypeError(f"adapters wrap nn.Linear/Conv1D outputs, not {type(module).__name__}")


class AdapterLayer(layers.Wrapper):
    """A hidden-size output projection plus any number of named bottleneck adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.hidden_size = output_size(base_layer)
        self.base_layer = base_layer
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str, cfg: AdapterConfig) -> None:
        if name in self.adapter_down:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        bottleneck = self.hidden_size // cfg.reduction_factor
        if bottleneck < 1:
            raise ValueError(f"method.reduction_factor={cfg.reduction_factor} leaves no bottleneck "
                             f"for hidden size {self.hidden_size}")
        w = self.base_layer.weight
        # fp32 even on a bf16/fp16 base: the adapter is the trained master copy.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        down = nn.Linear(self.hidden_size, bottleneck, device=w.device, dtype=dtype)
        up = nn.Linear(bottleneck, self.hidden_size, device=w.device, dtype=dtype)
        if cfg.init == "near_zero":
            with torch.no_grad():
                nn.init.normal_(down.weight, std=1e-2)
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)  # up = 0: the block's output is unchanged at step 0
                nn.init.zeros_(up.bias)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.configs[name] = cfg

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [*self.adapter_down[name].parameters(), *self.adapter_up[name].parameters()]

    def forward(self, *args, **kwargs) -> Tensor:
        h = self.base_layer(*args, **kwargs)
        name = self.active_adapter
        if name is None or self.disabled:
            return h
        down, up = self.adapter_down[name], self.adapter_up[name]
        act = ACTIVATIONS[self.configs[name].non_linearity]
        # Master weights may be fp32 on a bf16 base: run in h's dtype (autocast does it too).
        z = F.linear(h, down.weight.to(h.dtype), down.bias.to(h.dtype))
        z = F.linear(act(z), up.weight.to(h.dtype), up.bias.to(h.dtype))
        return (h + z if self.configs[name].residual else z).to(h.dtype)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, active={self.active_adapter!r}, disabled={self.disabled}"


# ----------------------------------------------------------------------------- model level


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter-wrapped module, by full dotted name."""
    return layers.wrapper_layers(model, AdapterLayer)


def adapter_names(model: nn.Module) -> list[str]:
    """Adapter names present in the model (by first appearance in module order)."""
    return layers.adapter_names(adapter_layers(model))


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks of the model's ModuleList(s), by full name (``model.layers.3`` -> block)."""
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                full = f"{name}.{i}"
                if block_index(full) == i:
                    blocks[full] = child
    return blocks


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_adapter_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Full names of the modules whose output gets an adapter, in block order."""
    model_name = type(model).__name__
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"adapter: {model_name} has no transformer blocks (a ModuleList named "
                         "'layers', 'layer', 'h' or 'blocks')")
    first = next(iter(blocks.values()))
    layout = next((paths for paths in LAYOUTS.values() if all(_has(first, p) for p in paths)), None)
    if layout is None:
        known = "; ".join(f"{k}: {a} + {f}" for k, (a, f) in LAYOUTS.items())
        raise ValueError(f"adapter: {model_name}'s blocks ({type(first).__name__}) have no known "
                         f"attention/FFN output projections (supported layouts: {known})")
    indices = {name: block_index(name) for name in blocks}
    if cfg.layers_to_transform is not None:
        unknown = sorted(set(cfg.layers_to_transform) - set(indices.values()))
        if unknown:
            raise ValueError(f"method.layers_to_transform: {model_name} has no block {unknown} "
                             f"(blocks {min(indices.values())}..{max(indices.values())})")
    paths = layout if cfg.variant == "houlsby" else layout[1:]
    targets = []
    for name, idx in indices.items():
        if cfg.layers_to_transform is not None and idx not in cfg.layers_to_transform:
            continue
        for path in paths:
            if not _has(blocks[name], path):
                raise ValueError(f"adapter: block {name} of {model_name} has no {path!r}")
            targets.append(f"{name}.{path}")
    return targets


def apply_adapter(model: nn.Module, cfg: AdapterConfig, adapter_name: str = "default") -> None:
    """Wrap the target projections (or add an adapter to wrapped ones), freeze the rest,
    and make ``adapter_name`` the active, trainable adapter."""
    cfg.validate("method")
    _inject(model, find_adapter_targets(model, cfg), cfg, adapter_name)
    set_adapter(model, adapter_name)


def _inject(model: nn.Module, targets: list[str], cfg: AdapterConfig, adapter_name: str) -> None:
    layers.check_new_adapter_name(adapter_layers(model), adapter_name)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            model.set_submodule(name, module)
        module.add_adapter(adapter_name, cfg)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter; only its parameters stay trainable."""
    layers.set_active(model, _require_layers(model), name)


def disable_adapters(model: nn.Module) -> AbstractContextManager[None]:
    """Inside the block the model computes the pure base output, without copying it."""
    return layers.disabled(_require_layers(model))


def _require_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return layers.require_layers(model, AdapterLayer, "adapter", "apply_adapter")


# ----------------------------------------------------------------------------- on disk


def save_adapter(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write ``adapter_name`` in peftlab's adapter format (see the module docstring)."""
    saved, cfg = layers.adapter_to_save(model, AdapterLayer, adapter_name)
    tensors: dict[str, Tensor] = {}
    for name, layer in saved.items():
        down, up = layer.adapter_down[adapter_name], layer.adapter_up[adapter_name]
        for kind, t in zip(_KINDS, (down.weight, down.bias, up.weight, up.bias), strict=True):
            tensors[f"{peft_format.PREFIX}{name}.{kind}"] = t
    config = {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
        "target_modules": sorted(saved),
        **asdict(cfg),
    }
    peft_format.write_adapter(directory, config, tensors)


def load_adapter(model: nn.Module, directory: str | PathLike,
                 adapter_name: str = "default") -> AdapterConfig:
    """Load a peftlab adapter into ``model`` and make it active; returns its config."""
    cfg, config_path = peft_format.read_method_config(directory, PEFT_TYPE, AdapterConfig)
    tensors, weights_path = peft_format.read_weights(directory)
    targets = find_adapter_targets(model, cfg)
    # Check every key and shape before touching the model.
    expected: dict[str, tuple[int, ...]] = {}
    for t in targets:
        hidden = output_size(model.get_submodule(t))
        b = hidden // cfg.reduction_factor
        for kind, shape in zip(_KINDS, ((b, hidden), (b,), (hidden, b), (hidden,)), strict=True):
            expected[f"{peft_format.PREFIX}{t}.{kind}"] = shape
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{weights_path}: unexpected key {key!r} (not an adapter tensor that "
                             f"{config_path} places on {type(model).__name__})")
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"{weights_path}: missing key {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{weights_path}: key {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"the model expects {shape}")
    _inject(model, targets, cfg, adapter_name)  # the init is overwritten just below
    for t in targets:
        layer = model.get_submodule(t)
        down, up = layer.adapter_down[adapter_name], layer.adapter_up[adapter_name]
        for kind, param in zip(_KINDS, (down.weight, down.bias, up.weight, up.bias), strict=True):
            key = f"{peft_format.PREFIX}{t}.{kind}"
            peft_format.copy_tensor(param, tensors[key], key, weights_path)
    set_adapter(model, adapter_name)
    return cfg


register(Method(name="adapter", config_cls=AdapterConfig, apply=apply_adapter, save=save_adapter,
                load=load_adapter, peft_type=PEFT_TYPE,
                present=lambda m: bool(adapter_layers(m)), disable=disable_adapters))
