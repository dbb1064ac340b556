"""(IA)^3: learned per-channel rescaling vectors, written from scratch in peft's on-disk format.

(IA)^3 (Liu et al. 2022, https://arxiv.org/abs/2205.05638) multiplies three activations by
learned vectors: the attention keys ``l_k``, the attention values ``l_v`` and the FFN's inner
activation ``l_ff``. For a projection ``y = W x + b`` that means

    y = l * (W x + b)          output rescaling (keys, values: k_proj/v_proj, BERT key/value)
    y = W (l * x) + b          input rescaling ("feedforward" modules: the FFN down projection)

Each target ``nn.Linear`` (or GPT-2 ``Conv1D``) is replaced in place by :class:`IA3Linear`,
which keeps the original as ``base_layer`` and stores one vector per named adapter in
``ia3_l[name]``, shaped like peft's: ``(out, 1)`` for output rescaling, ``(1, in)`` for input
rescaling. With the vectors at 1 (the default init) the model is unchanged. Because the
update is a diagonal scaling, it folds exactly into ``W`` (:func:`merge`).

Files match ``PeftModel.save_pretrained`` (``base_model.model.<module>.ia3_l``), so adapters
move freely between peftlab and peft; peft itself is only used by the tests.

Defaults per architecture follow peft's ``TRANSFORMERS_MODELS_TO_IA3_*`` tables, with one
deliberate difference: for Qwen2/Qwen3 peft rescales ``q_proj``; we rescale ``k_proj`` as the
paper (and peft's own Llama/Mistral entries) do.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from peftlab.config import ConfigError
from peftlab.methods import layers, peft_format
from peftlab.methods.registry import Method, register
from peftlab.models.targets import find_target_modules

# model_type -> (target_modules, feedforward_modules); list entries match a full module name
# or its "."-separated suffix, as in peft.
_LLAMA_LIKE = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_BERT_LIKE = (["key", "value", "output.dense"], ["output.dense"])
DEFAULT_MODULES: dict[str, tuple[list[str], list[str]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,  # peft: q_proj (not keys); we follow the paper
    "qwen3": _LLAMA_LIKE,
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # c_attn is fused q|k|v: all three scaled
    "bert": _BERT_LIKE,  # "output.dense" also matches attention.output.dense, as in peft
    "roberta": _BERT_LIKE,
}


@dataclass
class IA3Config:
    """(IA)^3 hyper-parameters.

    target_modules: modules whose output (or, for feedforward ones, input) is rescaled. None =
    the architecture's default (see ``DEFAULT_MODULES``); otherwise a list (full names or
    suffixes), a regex (full match) or "all-linear", as for LoRA.
    feedforward_modules: which of the targets get input rescaling. None = the architecture's
    default FFN down projection (or none for an unknown architecture); [] = none.
    init_ia3_weights: True starts at 1 (identity); False draws N(0, 1) (peft's False; tests).
    modules_to_save: extra modules (e.g. a fresh classifier head) trained in full and saved
    with the adapter, as in peft.
    """

    target_modules: str | list[str] | None = None
    feedforward_modules: str | list[str] | None = None
    init_ia3_weights: bool = True
    modules_to_save: list[str] | None = None

    def validate(self, where: str) -> None:
        for key in ("target_modules", "feedforward_modules"):
            value = getattr(self, key)
            # An empty feedforward list is meaningful: every target scales its output.
            empty_ok = key == "feedforward_modules"
            if isinstance(value, list) and not ((value or empty_ok)
                                                and all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"{where}.{key} must be a non-empty list of module names, got {value!r}")
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ConfigError(f"{where}.{key}: {value!r} is not a valid regex: {err}") from None
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"{where}.init_ia3_weights must be true or false")


class IA3Linear(layers.Wrapper):
    """A Linear/Conv1D plus named (IA)^3 vectors, one of them active.

    ``is_feedforward`` decides where the vector acts: on the input (FFN down projection) or on
    the output (keys/values). It is a property of the layer, shared by all its adapters.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(f"(IA)^3 supports nn.Linear and Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        # Conv1D (GPT-2) stores its weight as (in, out), the transpose of nn.Linear's (out, in).
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        self.ia3_l = nn.ParameterDict()
        self.configs: dict[str, IA3Config] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self._merged_scale: Tensor | None = None  # the vector folded in, to unmerge exactly

    @property
    def vector_shape(self) -> tuple[int, int]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def add_adapter(self, name: str, cfg: IA3Config) -> None:
        if name in self.ia3_l:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged_adapter is not None:
            raise RuntimeError("unmerge the model before adding an adapter")
        w = self.base_layer.weight
        # fp32 master copy on a bf16/fp16 base: tiny, and bf16 cannot resolve 1 + 1e-3.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        vector = torch.ones(self.vector_shape, device=w.device, dtype=dtype)
        if not cfg.init_ia3_weights:
            nn.init.normal_(vector)
        self.ia3_l[name] = nn.Parameter(vector)
        self.configs[name] = cfg

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]]

    def forward(self, x: Tensor) -> Tensor:
        name = self.active_adapter
        if self.disabled and self.merged_adapter is not None:
            raise RuntimeError("cannot disable a merged (IA)^3 layer; unmerge it first")
        if name is None or self.disabled or self.merged_adapter is not None:
            return self.base_layer(x)
        scale = self.ia3_l[name].flatten()
        # Multiply in the vector's (fp32) precision, then return to the activation dtype, as peft.
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active vector into the base weight (and, for output scaling, the bias)."""
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return
        scale = self.ia3_l[name].detach().float().flatten().clone()
        self._scale_base(scale)
        self._merged_scale = scale
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged vector back out (exact up to rounding in fp32; lossy on bf16)."""
        if self.merged_adapter is None:
            return
        scale = self._merged_scale
        if bool((scale == 0).any()):
            raise RuntimeError("cannot unmerge: the merged (IA)^3 vector has zero entries, so the "
                               "original weights are lost")
        self._scale_base(1.0 / scale)
        self.merged_adapter = None
        self._merged_scale = None

    def _scale_base(self, scale: Tensor) -> None:
        w, b = self.base_layer.weight, self.base_layer.bias
        # Scaled dimension: out (rows of Linear, columns of Conv1D) or in (the other one).
        along_out = not self.is_feedforward
        shape = (-1, 1) if along_out != self.fan_in_fan_out else (1, -1)
        w.copy_(w.float() * scale.view(shape))
        if along_out and b is not None:
            b.copy_(b.float() * scale)

    def extra_repr(self) -> str:
        kind = "input" if self.is_feedforward else "output"
        return (f"scales={kind}, active={self.active_adapter!r}, disabled={self.disabled}, "
                f"merged={self.merged_adapter!r}")


# ----------------------------------------------------------------------------- model level


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """Every (IA)^3-wrapped module, by full dotted name."""
    return layers.wrapper_layers(model, IA3Linear)


def adapter_names(model: nn.Module) -> list[str]:
    return layers.adapter_names(ia3_layers(model))


def resolve_modules(model: nn.Module, cfg: IA3Config) -> tuple[list[str], list[str]]:
    """(targets, feedforward targets) as full module names, architecture defaults filled in."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = DEFAULT_MODULES.get(model_type)
    targets_spec = cfg.target_modules
    if targets_spec is None:
        if default is None:
            raise ValueError(f"(IA)^3 has no default target_modules for model_type {model_type!r} "
                             f"(known: {sorted(DEFAULT_MODULES)}); set method.target_modules and "
                             "method.feedforward_modules")
        targets_spec = default[0]
    targets = find_target_modules(model, targets_spec)
    ff_spec = cfg.feedforward_modules
    if ff_spec is None:
        ff_spec = default[1] if default is not None else []
    elif isinstance(ff_spec, list):
        # An explicit feedforward entry that adapts nothing is almost surely a typo (peft too
        # requires feedforward_modules to be a subset of target_modules).
        for entry in ff_spec:
            if not any(_matches(name, [entry]) for name in targets):
                raise ValueError(f"feedforward_modules entry {entry!r} matches none of the target "
                                 f"modules {targets}")
    feedforward = [name for name in targets if _matches(name, ff_spec)]
    return targets, feedforward


def _matches(name: str, spec: str | list[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def apply_ia3(model: nn.Module, cfg: IA3Config, adapter_name: str = "default") -> None:
    """Wrap the target modules (or add an adapter to wrapped ones), freeze everything else, and
    make ``adapter_name`` the active, trainable adapter."""
    cfg.validate("method")
    targets, feedforward = resolve_modules(model, cfg)
    _inject(model, targets, set(feedforward), cfg, adapter_name)
    set_adapter(model, adapter_name)


def _inject(model: nn.Module, targets: list[str], feedforward: set[str], cfg: IA3Config,
            adapter_name: str) -> None:
    layers.check_new_adapter_name(ia3_layers(model), adapter_name)
    # fail before touching the model
    peft_format.check_targets_outside_saved(model, targets, cfg.modules_to_save)
    for name in targets:
        module = model.get_submodule(name)
        is_ff = name in feedforward
        if isinstance(module, IA3Linear):
            if module.is_feedforward != is_ff:
                raise ValueError(f"{name}: already adapted with "
                                 f"{'input' if module.is_feedforward else 'output'} scaling; "
                                 "another adapter cannot scale the other side")
        else:
            module = IA3Linear(module, is_feedforward=is_ff)
            model.set_submodule(name, module)
        module.add_adapter(adapter_name, cfg)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter; only its vectors (and modules_to_save) stay trainable."""
    layers.set_active(model, _require_layers(model), name)


def disable_adapters(model: nn.Module) -> AbstractContextManager[None]:
    """Inside the block the model computes the pure base output. Merged layers are unmerged
    for the block and merged back after it."""
    return layers.disabled(_require_layers(model))


def merge(model: nn.Module) -> None:
    """Fold each layer's active vector into its base weight (no inference overhead)."""
    layers.merge_all(_require_layers(model))


def unmerge(model: nn.Module) -> None:
    layers.unmerge_all(_require_layers(model))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and put plain base layers back: a normal transformers model."""
    return layers.replace_with_base(model, _require_layers(model))


def _require_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return layers.require_layers(model, IA3Linear, "(IA)^3", "apply_ia3")


# ----------------------------------------------------------------------------- peft format

_SUFFIX = ".ia3_l"


def save_ia3(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write ``adapter_name`` as a peft IA3 adapter (loadable by ``PeftModel.from_pretrained``).

    ``task_type`` None: inferred from the model class (CAUSAL_LM, SEQ_CLS, ...). A SEQ_CLS
    file always carries the classification head, as peft's loader requires (see
    :func:`peftlab.methods.peft_format.file_modules_to_save`).
    """
    saved, cfg = layers.adapter_to_save(model, IA3Linear, adapter_name)
    task_type = task_type if task_type is not None else peft_format.infer_task_type(model)
    to_save = peft_format.file_modules_to_save(model, task_type, cfg.modules_to_save)
    prefix = peft_format.PREFIX
    tensors = {f"{prefix}{name}{_SUFFIX}": layer.ia3_l[adapter_name] for name, layer in saved.items()}
    tensors.update(peft_format.modules_to_save_tensors(model, to_save))
    config = {
        "peft_type": "IA3",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "task_type": task_type,
        "inference_mode": True,
        # Full names: unambiguous for peft (exact match) and for us.
        "target_modules": sorted(saved),
        "feedforward_modules": sorted(n for n, m in saved.items() if m.is_feedforward),
        "exclude_modules": None,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in saved.values()),
        "init_ia3_weights": cfg.init_ia3_weights,
        "modules_to_save": to_save,
    }
    peft_format.write_adapter(directory, config, tensors)


def _read_config(directory: str | PathLike) -> tuple[dict[str, Any], Path]:
    raw, path = peft_format.read_raw_config(directory, "IA3")
    ff = raw.get("feedforward_modules")
    if ff is not None and not (isinstance(ff, str) or (isinstance(ff, list)
                                                       and all(isinstance(f, str) for f in ff))):
        raise ConfigError(f"{path}: key 'feedforward_modules' must be a string or a list of "
                          f"names, got {ff!r}")
    init = raw.get("init_ia3_weights", True)
    if not isinstance(init, bool):
        raise ConfigError(f"{path}: key 'init_ia3_weights' must be true or false, got {init!r}")
    peft_format.check_modules_to_save_key(raw, path)
    return raw, path


def load_ia3(model: nn.Module, directory: str | PathLike, adapter_name: str = "default") -> IA3Config:
    """Load a peft (or peftlab) IA3 adapter into ``model`` and make it active.

    The tensor file says which modules are adapted; a vector's shape says whether it scales the
    input ``(1, in)`` or the output ``(out, 1)``, and must agree with the config's
    ``feedforward_modules``. Returns the adapter's config with full module names.
    """
    raw, config_path = _read_config(directory)
    tensors, weights_path = peft_format.read_weights(directory)
    vectors = {k[len(peft_format.PREFIX):-len(_SUFFIX)]: v for k, v in tensors.items()
               if k.startswith(peft_format.PREFIX) and k.endswith(_SUFFIX)}
    extra = {k: v for k, v in tensors.items()
             if not (k.startswith(peft_format.PREFIX) and k.endswith(_SUFFIX))}
    if not vectors:
        raise ValueError(f"{weights_path}: holds no IA3 tensors (keys like "
                         f"'{peft_format.PREFIX}<module>{_SUFFIX}')")
    ff_spec = raw.get("feedforward_modules") or []
    modules = dict(model.named_modules())
    feedforward = set()
    for name, tensor in vectors.items():
        key = f"{peft_format.PREFIX}{name}{_SUFFIX}"
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Conv1D, IA3Linear)):
            what = "no such module" if module is None else f"a {type(module).__name__}, not Linear/Conv1D"
            raise ValueError(f"{weights_path}: unexpected key {key!r}: {name!r} is {what} in this model")
        is_ff = _matches(name, ff_spec)
        base = module.base_layer if isinstance(module, IA3Linear) else module
        out_f, in_f = (base.weight.shape[1], base.weight.shape[0]) if isinstance(base, Conv1D) \
            else base.weight.shape
        expected = (1, in_f) if is_ff else (out_f, 1)
        if tuple(tensor.shape) != expected:
            side = "input (feedforward_modules)" if is_ff else "output"
            raise ValueError(f"{weights_path}: key {key!r} has shape {tuple(tensor.shape)}; "
                             f"{config_path} makes it scale the {side}, which needs {expected}")
        if is_ff:
            feedforward.add(name)
    cfg = IA3Config(target_modules=sorted(vectors), feedforward_modules=sorted(feedforward),
                    init_ia3_weights=raw.get("init_ia3_weights", True),
                    modules_to_save=raw.get("modules_to_save") or None)
    pairs = peft_format.match_modules_to_save(model, cfg.modules_to_save, extra, weights_path,
                                              "an IA3 vector")

    _inject(model, sorted(vectors), feedforward, cfg, adapter_name)
    with torch.no_grad():
        for name, tensor in vectors.items():
            model.get_submodule(name).ia3_l[adapter_name].copy_(tensor)
        for param, tensor in pairs:
            param.copy_(tensor)
    set_adapter(model, adapter_name)
    return cfg


register(Method(name="ia3", config_cls=IA3Config, apply=apply_ia3, save=save_ia3,
                load=load_ia3, peft_type="IA3",
                present=lambda m: bool(ia3_layers(m)), merge=merge_and_unload,
                disable=disable_adapters))
