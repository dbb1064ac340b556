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
    packed rows and our own KV-cache decoding loop cannot be used with it;
    ``param_groups(model, config)``: optimizer groups for the model's trainable parameters
    (e.g. LoRA+ trains lora_B at a larger lr), see :func:`optimizer_param_groups`.
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
    param_groups: Callable[[nn.Module, Any], list[dict[str, Any]]] | None = None

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.config_cls)]


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def method_names() -> list[str]:
    return METHODS.names()


def optimizer_param_groups(model: nn.Module, method: Method, config: Any) -> list[dict[str, Any]]:
    """``model``'s trainable parameters as optimizer groups, for every training loop.

    A group is ``{"params": [...]}`` plus optionally ``lr_scale`` (its lr is ``train.lr``
    times that) and ``weight_decay``; ``runtime.optim.make_optimizer`` reads both. Without a
    ``param_groups`` capability there is one group. Trainable parameters the method's groups
    leave out (nothing it owns) form a last, plain group; a parameter in two groups, or one
    that is frozen, is a bug in the method and raises.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method.param_groups is None:
        return [{"params": trainable}]
    groups = [g for g in method.param_groups(model, config) if g["params"]]
    wanted = {id(p) for p in trainable}
    seen: set[int] = set()
    for group in groups:
        for p in group["params"]:
            if id(p) in seen or id(p) not in wanted:
                raise RuntimeError(f"method {method.name!r}: param_groups lists a parameter "
                                   "twice, or a frozen one")
            seen.add(id(p))
    rest = [p for p in trainable if id(p) not in seen]
    return groups + ([{"params": rest}] if rest else [])


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
