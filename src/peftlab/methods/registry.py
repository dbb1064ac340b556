"""The method registry: one name -> one config dataclass + functions that inject it.

A method knows nothing about tasks or training. It injects modules in place, marks
only its own parameters trainable, and (optionally) maps itself to the peft format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.files import read_json


@dataclass(frozen=True)
class Method:
    """A registered fine-tuning method.

    apply(model, config, adapter_name) injects the method into ``model`` in place.
    save/load, when present, write and read the on-disk adapter format.
    """

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any, str], None]
    save: Callable[..., None] | None = None
    load: Callable[..., Any] | None = None
    peft_type: str | None = None  # the ``peft_type`` written in adapter_config.json

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.config_cls)]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    from peftlab.config import ConfigError, suggest

    if name not in _REGISTRY:
        raise ConfigError(
            f"method.name: unknown method {name!r}{suggest(name, list(_REGISTRY))}; "
            f"known methods: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_for_adapter_dir(directory: str | Path) -> Method:
    """The registered method that reads the adapter saved in ``directory``."""
    config_path = Path(directory) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no adapter_config.json (not an adapter directory)")
    peft_type = read_json(config_path).get("peft_type")
    for method in _REGISTRY.values():
        if method.peft_type and method.peft_type == peft_type:
            return method
    known = sorted(m.peft_type for m in _REGISTRY.values() if m.peft_type)
    raise ValueError(f"{config_path}: peft_type {peft_type!r} is not supported (known: {known})")
