"""The peft on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

This module knows files, JSON keys and tensor names (and which modules those names point
at); it changes a model only by copying a checked tensor into its parameter, so peft
compatibility rules live in one place. Methods peft does not have (freeze, full, adapter)
write the same two files with their own ``peft_type``. Weights are
read with safetensors only, never with torch.load/pickle, so loading cannot execute code.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from peftlab.config import ConfigError
from peftlab.files import read_json, read_safetensors, write_atomic, write_text_atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the transformers model

# Suffix of a tensor key -> which LoRA tensor it is. peft drops the adapter name on disk.
TENSOR_KINDS = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "magnitude",
}

# peft features that change the maths or the base weights; loading them as plain LoRA
# would silently give wrong outputs, so they are refused by key name.
_MUST_BE_EMPTY = (
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "loftq_config",
)
# init_lora_weights values whose adapter only makes sense on a base that peft modified
# (PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ rewrite W) or that select another forward (MiCA). Exactly
# "pissa" and "olora" are deterministic functions of W, so peftlab recomputes them at load
# time and loads such an adapter as a plain LoRA (methods.lora_init); randomized PiSSA
# ("pissa_niter_<k>") and the data-dependent inits cannot be recomputed.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "mica")
_INIT_FROM_PEFT = {True: "kaiming", False: "random", "gaussian": "gaussian",
                   "eva": "kaiming", "orthogonal": "kaiming", "pissa": "pissa", "olora": "olora"}
INIT_TO_PEFT: dict[str, bool | str] = {"kaiming": True, "gaussian": "gaussian", "random": False}


def peft_config_dict(
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    layers_to_transform: list[int] | None,
    use_rslora: bool,
    use_dora: bool,
    init: str,
    fan_in_fan_out: bool,
    modules_to_save: list[str] | None,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """A conservative adapter_config.json: only keys every recent peft version understands."""
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "task_type": task_type,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "layers_to_transform": layers_to_transform,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": INIT_TO_PEFT[init],
        "modules_to_save": modules_to_save,
    }


def write_adapter(directory: str | os.PathLike, config: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> None:
    """Write both files atomically (weights first, so a config never points at half a file)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_atomic(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomic(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def read_raw_config(directory: str | os.PathLike,
                    peft_type: str | None = None) -> tuple[dict[str, Any], Path]:
    """adapter_config.json as a dict (checked to be ``peft_type`` if given), and its path."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config found (expected a peft adapter directory)")
    raw = read_json(path)
    if peft_type is not None and raw.get("peft_type") != peft_type:
        raise ConfigError(f"{path}: key 'peft_type' is {raw.get('peft_type')!r}; expected {peft_type!r}")
    return raw, path


def check_modules_to_save_key(raw: dict[str, Any], path: Path) -> None:
    """Every peft config may carry ``modules_to_save``: a list of module names or null."""
    to_save = raw.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and all(isinstance(m, str) for m in to_save)):
        raise ConfigError(f"{path}: key 'modules_to_save' must be a list of module names, got {to_save!r}")


def read_config(directory: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read adapter_config.json and map it onto peftlab LoraConfig field values.

    Unknown keys are ignored (peft adds new ones every release); keys for features we do not
    implement are an error naming the file and the key.
    """
    raw, path = read_raw_config(directory)
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: key 'peft_type' is {raw.get('peft_type')!r}; only 'LORA' is supported")
    for key in _MUST_BE_EMPTY:
        if raw.get(key):
            raise ConfigError(f"{path}: key {key!r} = {raw[key]!r} is not supported by peftlab's LoRA")
    if raw.get("bias", "none") != "none":
        raise ConfigError(f"{path}: key 'bias' = {raw['bias']!r} is not supported (only 'none')")

    init_raw = raw.get("init_lora_weights", True)
    if (isinstance(init_raw, str) and init_raw.lower().startswith(_BASE_CHANGING_INITS)
            and init_raw.lower() not in _INIT_FROM_PEFT):
        raise ConfigError(
            f"{path}: key 'init_lora_weights' = {init_raw!r} is not supported: that adapter only "
            "works on a base model that peft modified (or uses another forward pass); of those, "
            "peftlab loads 'pissa' and 'olora'"
        )
    init_key = init_raw.lower() if isinstance(init_raw, str) else init_raw
    if init_key not in _INIT_FROM_PEFT:
        raise ConfigError(f"{path}: key 'init_lora_weights' has unknown value {init_raw!r}")

    r = raw.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{path}: key 'r' must be an integer >= 1, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"{path}: key 'lora_alpha' must be a number, got {alpha!r}")
    dropout = raw.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"{path}: key 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise ConfigError(f"{path}: key 'target_modules' must be a string or a list, got {targets!r}")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]  # peft allows a single int
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise ConfigError(f"{path}: key 'layers_to_transform' must be a list of integers, got {layers!r}")
    check_modules_to_save_key(raw, path)

    fields = {
        "r": r,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "target_modules": targets,  # None is resolved from the tensor names by the caller
        "layers_to_transform": layers,
        "use_rslora": bool(raw.get("use_rslora", False)),
        "use_dora": bool(raw.get("use_dora", False)),
        "init": _INIT_FROM_PEFT[init_key],
        "modules_to_save": raw.get("modules_to_save") or None,
    }
    return fields, path


def read_weights(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """Load adapter_model.safetensors (and refuse pickled adapter_model.bin)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / "adapter_model.bin").is_file():
            raise FileNotFoundError(
                f"{path}: missing; only a pickled adapter_model.bin exists, which peftlab does not "
                "load (unsafe). Convert it to safetensors first."
            )
        raise FileNotFoundError(f"{path}: adapter weights not found")
    return read_safetensors(path), path


def split_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A.weight`` -> (module, "lora_A"); None if not LoRA."""
    if not key.startswith(PREFIX):
        return None
    for suffix, kind in TENSOR_KINDS.items():
        if key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], kind
    return None


# ----------------------------------------------------------------------------- model <-> file


def infer_task_type(model: nn.Module) -> str | None:
    """peft's task_type for a transformers model class (decides peft's PeftModel subclass)."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def file_modules_to_save(model: nn.Module, task_type: str | None,
                         names: list[str] | None) -> list[str] | None:
    """``modules_to_save`` to write for an adapter of ``task_type``.

    peft's SEQ_CLS loader always wraps the classification head and fails on a file without it,
    so for SEQ_CLS the head ("classifier"/"score") is added when the config did not name it: the
    file then carries its current (possibly untouched) weights, and loading the file makes the
    head trainable, as peft does for SEQ_CLS.
    """
    if task_type != "SEQ_CLS":
        return names
    heads = [h for h in ("classifier", "score") if isinstance(getattr(model, h, None), nn.Module)]
    names = list(names or [])
    return names + [h for h in heads if h not in names] or None


def find_modules_to_save(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Modules named (fully or by suffix, as in peft) in ``modules_to_save``."""
    found = {n: m for n, m in model.named_modules()
             if n and any(n == s or n.endswith("." + s) for s in names)}
    if not found:
        raise ValueError(f"modules_to_save={names!r} matched no module of {type(model).__name__}")
    return found


def check_targets_outside_saved(model: nn.Module, targets: list[str],
                                names: list[str] | None) -> None:
    """A target module inside a module that ``modules_to_save`` trains in full would be
    saved twice, under two keys that share memory (safetensors refuses that at the very end
    of training); refuse it before the model is touched, naming both."""
    if not names:
        return
    saved = find_modules_to_save(model, names)
    for target in targets:
        owner = next((s for s in saved if target == s or target.startswith(s + ".")), None)
        if owner is not None:
            raise ConfigError(
                f"method.target_modules: {target!r} lies inside {owner!r}, which "
                f"modules_to_save ({names}) trains in full; exclude it from target_modules "
                "(a list of names, or a regex that does not match it)")


def modules_to_save_tensors(model: nn.Module, names: list[str] | None,
                            prefix: str = PREFIX) -> dict[str, nn.Parameter]:
    """File key -> parameter for every module in ``modules_to_save`` (``<prefix><module>.<param>``)."""
    tensors = {}
    for name, module in (find_modules_to_save(model, names) if names else {}).items():
        for pname, p in module.named_parameters():
            tensors[f"{prefix}{name}.{pname}"] = p
    return tensors


def match_modules_to_save(model: nn.Module, names: list[str] | None, extra: dict[str, torch.Tensor],
                          path: os.PathLike, what: str,
                          prefix: str = PREFIX) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pair each file tensor that is not the method's own (``what``) with its modules_to_save
    parameter: all of those parameters, nothing else, shapes equal. Checked before loading."""
    params = modules_to_save_tensors(model, names, prefix)
    pairs = []
    for key, tensor in extra.items():
        if key not in params:
            raise ValueError(f"{path}: unexpected key {key!r} (not {what}, nor a parameter of "
                             "modules_to_save)")
        if params[key].shape != tensor.shape:
            raise ValueError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(params[key].shape)}")
        pairs.append((params[key], tensor))
    for key in params:
        if key not in extra:
            raise ValueError(f"{path}: missing key {key!r} (a parameter of modules_to_save)")
    return pairs


# ----------------------------------------------------------------------------- peftlab's own adapter formats


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_method_config(directory: str | os.PathLike, peft_type: str, cls: type) -> tuple[Any, Path]:
    """Read a peftlab-format adapter_config.json into ``cls`` (its known keys; others ignored)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config found")
    raw = read_json(path)
    if raw.get("peft_type") != peft_type:
        raise ConfigError(f"{path}: key 'peft_type' is {raw.get('peft_type')!r}, expected {peft_type!r}")
    cfg = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
    cfg.validate(str(path))  # errors read "<path>.<key> ...", as LoRA's
    return cfg, path


def copy_tensor(param: torch.Tensor, tensor: torch.Tensor, key: str, path: os.PathLike) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
