"""Full fine-tuning: every parameter trains (optionally minus ``exclude``).

There is no adapter, so saving writes the whole model. On-disk format, in the adapter
directory:

* ``model/``: ``model.save_pretrained(...)`` output (config.json, model.safetensors — always
  safetensors in transformers 5 — and generation_config.json): a plain transformers model
  directory, loadable by ``from_pretrained`` or as a peftlab ``model:``.
* ``adapter_config.json``: ``{"peft_type": "PEFTLAB_FULL", "method": "full", "exclude",
  "base_model_name_or_path", "task_type"}``, written last so it never points at half a model.
  ``method_for_adapter_dir`` picks ``full`` by that peft_type, as for every other method.

Why a ``model/`` subdirectory: transformers' ``from_pretrained`` treats any directory holding
an ``adapter_config.json`` as a peft adapter when peft is installed and fails on our
peft_type (KeyError 'PEFTLAB_FULL'), so the model files and the marker must not share a
directory.

``load(model, directory)`` copies the safetensors weights into the given model in place
(never torch.load). Keys that ``save_pretrained`` drops because they are tied (``lm_head.weight``
= ``model.embed_tokens.weight``) are accepted as missing when the tensor they share is loaded.

``exclude`` uses ``freeze``'s name matching (full name or suffix after "."; a str is a regex).
Excluding one name of a tied tensor freezes the tensor: ``exclude: [embed_tokens]`` also freezes
a tied ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from peftlab.config import ConfigError
from peftlab.files import read_json, read_safetensors
from peftlab.methods import peft_format
from peftlab.methods.freeze import CONFIG_ATTR, select_parameters
from peftlab.methods.registry import Method, register

PEFT_TYPE = "PEFTLAB_FULL"
MODEL_DIR = "model"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


@dataclass
class FullConfig:
    """exclude: modules/parameters kept frozen (e.g. ["embed_tokens"]); None trains all."""

    exclude: str | list[str] | None = None

    def validate(self, where: str) -> None:
        spec = self.exclude
        if spec is None:
            return
        if isinstance(spec, str):
            if not spec:
                raise ConfigError(f"{where}.exclude must not be an empty string")
            return
        if not isinstance(spec, list) or not spec or not all(isinstance(s, str) and s for s in spec):
            raise ConfigError(f"{where}.exclude must be a regex or a non-empty list of module "
                              f"names, got {spec!r}")


def apply_full(model: nn.Module, cfg: FullConfig | None = None, adapter_name: str = "default") -> None:
    """Make every parameter trainable except ``cfg.exclude`` (``adapter_name`` is unused:
    full fine-tuning changes the base weights in place)."""
    cfg = cfg or FullConfig()
    cfg.validate("method")
    frozen = select_parameters(model, cfg.exclude, "method.exclude") if cfg.exclude else {}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    setattr(model, CONFIG_ATTR, cfg)


def save_full(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write ``directory/model`` (save_pretrained, safetensors) and then adapter_config.json."""
    save_pretrained = getattr(model, "save_pretrained", None)
    if not callable(save_pretrained):
        raise TypeError(f"full: {type(model).__name__} is not a transformers model (no save_pretrained)")
    cfg = getattr(model, CONFIG_ATTR, None)
    cfg = cfg if isinstance(cfg, FullConfig) else FullConfig()
    out = Path(directory)
    # transformers 5 always writes safetensors (it has no safe_serialization switch any more).
    save_pretrained(out / MODEL_DIR)
    if not ((out / MODEL_DIR / _WEIGHTS).is_file() or (out / MODEL_DIR / _INDEX).is_file()):
        raise RuntimeError(f"{out / MODEL_DIR}: save_pretrained wrote no {_WEIGHTS}")
    peft_format.write_json_atomic(out / peft_format.CONFIG_NAME, {
        "peft_type": PEFT_TYPE,
        "method": "full",
        "exclude": cfg.exclude,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
    })


def _read_model_weights(model_dir: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """key -> (tensor, file) from model.safetensors or its sharded index."""
    single, index = model_dir / _WEIGHTS, model_dir / _INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: key 'weight_map' is missing or not a mapping")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        pickled = [p.name for p in model_dir.glob("*.bin")] if model_dir.is_dir() else []
        why = f" (only pickled {pickled}, which peftlab never loads)" if pickled else ""
        raise FileNotFoundError(f"{single}: full fine-tuning weights not found{why}")
    out: dict[str, tuple[torch.Tensor, Path]] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: shard listed in {index} not found")
        out.update({k: (v, f) for k, v in read_safetensors(f).items()})
    return out


def load_full(model: nn.Module, directory: str | PathLike, adapter_name: str = "default") -> FullConfig:
    """Copy the saved weights into ``model`` in place and re-apply ``exclude``."""
    cfg, config_path = peft_format.read_method_config(directory, PEFT_TYPE, FullConfig)
    model_dir = Path(directory) / MODEL_DIR
    tensors = _read_model_weights(model_dir)
    state = model.state_dict(keep_vars=True)
    for key, (_, path) in tensors.items():
        if key not in state:
            raise ValueError(f"{path}: unexpected key {key!r} (no such parameter or buffer in "
                             f"{type(model).__name__})")
    loaded = {id(state[k]) for k in tensors}
    for key, value in state.items():
        if key not in tensors and id(value) not in loaded:  # tied copies are not saved
            raise ValueError(f"{model_dir}: missing key {key!r} (saved from another architecture?)")
    for key, (tensor, path) in tensors.items():
        peft_format.copy_tensor(state[key], tensor, key, path)
    apply_full(model, cfg)
    return cfg


register(Method(name="full", config_cls=FullConfig, apply=apply_full, save=save_full,
                load=load_full, peft_type=PEFT_TYPE))
