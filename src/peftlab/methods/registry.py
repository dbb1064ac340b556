"""The method registry: one name -> one config dataclass + functions that inject it.

A method knows nothing about tasks or training. It injects modules in place, marks
only its own parameters trainable, and (optionally) maps itself to the peft format.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.files import read_json
from peftlab.plugins import METHODS


@dataclass(frozen=True)
class Method:
    """A registered fine-tuning method and what it can do.

    apply(model, config, adapter_name) injects the method into ``model`` in place.
    save/load, when present, write and read the on-disk adapter format.

    Capabilities, declared here so callers never probe a model's attributes:
    ``present(model)``: the method's layers/hooks are on ``model``;
    ``merge(model)``: fold them into the base weights and remove them (export, api.merge);
    ``disable(model)``: a context in which the model computes its base output in place --
    the frozen reference of DPO and PPO without a second copy (declared where that use is
    tested); ``virtual_tokens``: the method puts extra positions in front of the input, so
    packed rows and our own KV-cache decoding loop cannot be used with it.
    """

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any, str], None]
    save: Callable[..., None] | None = None
    load: Callable[..., Any] | None = None
    peft_type: str | None = None  # the ``peft_type`` written in adapter_config.json
    present: Callable[[nn.Module], bool] | None = None
    merge: Callable[[nn.Module], Any] | None = None
    disable: Callable[[nn.Module], AbstractContextManager[None]] | None = None
    virtual_tokens: bool = False

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.config_cls)]


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def method_names() -> list[str]:
    return METHODS.names()


def methods_on(model: nn.Module) -> list[Method]:
    """The registered methods whose layers or hooks are on ``model``."""
    return [m for m in METHODS if m.present is not None and m.present(model)]


def has_virtual_tokens(model: nn.Module) -> bool:
    return any(m.virtual_tokens for m in methods_on(model))


def method_for_adapter_dir(directory: str | Path) -> Method:
    """The registered method that reads the adapter saved in ``directory``."""
    config_path = Path(directory) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no adapter_config.json (not an adapter directory)")
    peft_type = read_json(config_path).get("peft_type")
    for method in METHODS:
        if method.peft_type and method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in METHODS if m.peft_type)
    raise ValueError(f"{config_path}: peft_type {peft_type!r} is not supported (known: {known})")
