"""Model-level operations shared by the wrapper-layer methods (LoRA, (IA)^3, adapters).

Each of those methods replaces target modules in place by a wrapper that keeps the original
as ``base_layer`` and holds named adapters: ``configs[name]`` (the adapter's config),
``adapter_parameters(name)``, ``active_adapter`` and ``disabled``. Wrappers whose update
folds into the base weight also have ``merge()``, ``unmerge()`` and ``merged_adapter``.
Finding, switching, disabling, merging and unloading those wrappers is the same for every
method, so it lives here once; each method keeps thin public functions over it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import Tensor, nn

from peftlab.methods.peft_format import find_modules_to_save

L = TypeVar("L", bound=nn.Module)


class Wrapper(nn.Module):
    """Base of the wrapper layers: the wrapped module is ``self.base_layer``.

    Some model code reads ``.weight``/``.bias`` of its projections (e.g. for dtype checks),
    so those read through to the base layer.
    """

    base_layer: nn.Module

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


def wrapper_layers(model: nn.Module, cls: type[L]) -> dict[str, L]:
    """Every ``cls`` wrapper in ``model``, by full dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def require_layers(model: nn.Module, cls: type[L], what: str, apply_fn: str) -> dict[str, L]:
    """:func:`wrapper_layers`, but a model without any is an error naming how to add them."""
    layers = wrapper_layers(model, cls)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no {what} layers; call {apply_fn} first")
    return layers


def adapter_names(layers: dict[str, nn.Module]) -> list[str]:
    """Adapter names on ``layers``, by first appearance in module order."""
    names: dict[str, None] = {}
    for layer in layers.values():
        names.update(dict.fromkeys(layer.configs))
    return list(names)


def check_new_adapter_name(layers: dict[str, nn.Module], adapter_name: str) -> None:
    """Names go into state-dict keys and files, so keep them plain and unique."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    if adapter_name in adapter_names(layers):
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name")


def set_active(model: nn.Module, layers: dict[str, nn.Module], name: str) -> None:
    """Make ``name`` active on ``layers``; only its parameters (and the config's
    ``modules_to_save``, if it has any) stay trainable."""
    if name not in adapter_names(layers):
        raise ValueError(f"unknown adapter {name!r}; the model has {adapter_names(layers)}")
    if any(getattr(layer, "merged_adapter", None) is not None for layer in layers.values()):
        raise RuntimeError("unmerge the model before switching adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = None
    for layer in layers.values():
        # Layers the adapter does not cover (e.g. other layers_to_transform) run the base only.
        layer.active_adapter = name if name in layer.configs else None
        if layer.active_adapter is not None:
            cfg = layer.configs[name]
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
    to_save = getattr(cfg, "modules_to_save", None)
    if to_save:
        for module in find_modules_to_save(model, to_save).values():
            module.requires_grad_(True)


@contextmanager
def disabled(layers: dict[str, nn.Module]) -> Iterator[None]:
    """Inside the block ``layers`` compute their pure base output (e.g. a frozen DPO/PPO
    reference) without a copy. Merged layers are unmerged for the block, merged back after."""
    mods = list(layers.values())
    merged = [layer for layer in mods if getattr(layer, "merged_adapter", None) is not None]
    previous = [layer.disabled for layer in mods]
    for layer in merged:
        layer.unmerge()
    for layer in mods:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, flag in zip(mods, previous, strict=True):
            layer.disabled = flag
        for layer in merged:
            layer.merge()


def merge_all(layers: dict[str, nn.Module]) -> None:
    """Fold each layer's active adapter into its base weight."""
    for layer in layers.values():
        layer.merge()


def unmerge_all(layers: dict[str, nn.Module]) -> None:
    for layer in layers.values():
        layer.unmerge()


def replace_with_base(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """Merge each layer and put its ``base_layer`` back: a plain transformers model."""
    for name, layer in layers.items():
        layer.merge()
        model.set_submodule(name, layer.base_layer)
    return model


def adapter_to_save(model: nn.Module, cls: type[L], adapter_name: str) -> tuple[dict[str, L], Any]:
    """(the layers holding ``adapter_name``, its config), or an error naming what exists."""
    all_layers = wrapper_layers(model, cls)
    layers = {n: m for n, m in all_layers.items() if adapter_name in m.configs}
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r} to save; the model has "
                         f"{adapter_names(all_layers)}")
    return layers, next(iter(layers.values())).configs[adapter_name]
