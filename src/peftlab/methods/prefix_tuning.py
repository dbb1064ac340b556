"""Prefix tuning (Li & Liang, 2021), written from scratch and saved in peft's on-disk format.

Every attention layer gets ``num_virtual_tokens`` trainable key/value vectors that all real
tokens attend to, as if a learned prompt had been run through the model first. They live in
a :class:`PrefixEncoder` with peft's parameter layout (``embedding.weight`` and, with
``prefix_projection``, ``transform.0/2.weight|bias``)::

    flat = embedding.weight                                  (nvt, num_layers * 2 * kv_dim)
    flat = Linear(Tanh(Linear(embedding.weight)))            (prefix_projection)
    flat -> view (nvt, num_layers * 2, kv_heads, head_dim) -> layer l: key 2l, value 2l + 1

No wrapper model: the model stays the transformers object (our Trainer, the SFT loss that
calls ``model.base_model(...)`` and HF ``generate`` all call it directly). A forward pre-hook
on the backbone (``model.base_model``: LlamaModel, GPT2Model, BertModel, ...) does what
peft's ``PeftModel.forward`` / ``prepare_inputs_for_generation`` do around the base model:

* no past (or an empty cache, as ``generate`` passes on its first step): the prefix keys and
  values are written into a ``DynamicCache``, so transformers' own attention concatenates
  them in front of the real keys. The cache tensors are computed from the parameters, so
  gradients reach the prefix. ``use_cache=False`` (our SFT loss) does not matter: attention
  layers use any cache they are handed; ``use_cache`` only decides whether it is returned.
* a non-empty cache is assumed to hold the prefix already (a later ``generate`` step).
* every call: a 2D ``attention_mask`` over the real tokens gets ``num_virtual_tokens`` ones
  prepended, and explicit ``position_ids`` are shifted by ``num_virtual_tokens`` (peft's
  ``_adjust_prompt_learning_kwargs``). Without position ids the model counts from the cache
  length, i.e. real tokens also start at position ``num_virtual_tokens`` -- as in peft.

Works for decoder-only models whose backbone takes a KV cache (``cache`` from transformers
5.24 on, ``past_key_values`` before: :mod:`peftlab.models.kv_cache`) and whose attention
layers all share one KV shape (Llama/Mistral/Qwen2-style with GQA, GPT-2) and for BERT-style
encoders (transformers 5 still feeds the cache to BertSelfAttention). Refused with an error:
encoder-decoder models, per-layer KV shapes (Gemma 4 style), legacy tuple caches and
non-dynamic caches (StaticCache), and gradient checkpointing (it drops the cache).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from peftlab.config import ConfigError
from peftlab.files import read_json
from peftlab.methods import peft_format
from peftlab.methods.registry import Method, register
from peftlab.methods.virtual_tokens import SAVE_PREFIX, modules_to_save_tensors
from peftlab.models.kv_cache import cache_keyword, output_cache, output_cache_name, pop_cache

PEFT_TYPE = "PREFIX_TUNING"
WEIGHTS_KEY = "prompt_embeddings"  # peft's tensor for the flattened (projected) prefix
ATTR = "prefix_encoder"  # the ModuleDict of adapters, attached to the backbone


@dataclass
class PrefixTuningConfig:
    """num_virtual_tokens: prefix length per layer. prefix_projection: learn the prefix through
    an MLP (Embedding -> Linear(kv_dim, encoder_hidden_size) -> Tanh -> Linear(..., the flat
    prefix)), which the paper found trains more stably; only the projected prefix is saved.
    encoder_hidden_size: the MLP's width (None: kv_dim = num_kv_heads * head_dim, as in peft).
    modules_to_save: extra modules (a new classifier head; the classification task fills this
    in) trained in full and saved with the adapter as peft does. Trained in place, shared by
    all adapters; ``disable_adapters`` does not undo them.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self, where: str) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}.num_virtual_tokens must be an integer >= 1, got {n!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ConfigError(f"{where}.encoder_hidden_size must be an integer >= 1, got {h!r}")
        if h is not None and not self.prefix_projection:
            raise ConfigError(f"{where}.encoder_hidden_size is only used with "
                              "prefix_projection: true (set it, or drop encoder_hidden_size)")
        names = self.modules_to_save
        if names is not None and not all(isinstance(m, str) and m for m in names):
            raise ConfigError(f"{where}.modules_to_save must be a list of module names, "
                              f"got {names!r}")


@dataclass(frozen=True)
class KVShape:
    """What one attention layer's cache holds per token: ``num_heads`` (KV heads) x ``head_dim``."""

    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:  # peft's ``token_dim`` (kv_dim under GQA)
        return self.num_heads * self.head_dim


class PrefixEncoder(nn.Module):
    """The trainable prefix; parameter names match peft's ``prompt_encoder.<adapter>``."""

    def __init__(self, num_virtual_tokens: int, shape: KVShape, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.shape = shape
        self.modules_to_save: list[str] | None = None  # set by apply_prefix_tuning
        flat = shape.num_layers * 2 * shape.token_dim
        if prefix_projection:
            hidden = encoder_hidden_size or shape.token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, shape.token_dim)
            self.transform = nn.Sequential(nn.Linear(shape.token_dim, hidden), nn.Tanh(),
                                           nn.Linear(hidden, flat))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, flat)
            self.transform = None

    def forward(self) -> Tensor:
        """The flat prefix, (num_virtual_tokens, num_layers * 2 * token_dim)."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Per layer (key, value), each (batch, num_heads, num_virtual_tokens, head_dim)."""
        s = self.shape
        kv = self().to(dtype)
        kv = kv.view(self.num_virtual_tokens, s.num_layers * 2, s.num_heads, s.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (layers*2, heads, nvt, head_dim); rows 2l / 2l+1 = K / V
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(s.num_layers)]


class PrefixAdapters(nn.ModuleDict):
    """Named prefix encoders on a backbone, plus which one is active and the hook handles."""

    def __init__(self, positional_names: list[str]):
        super().__init__()
        self.active: str | None = None
        self.disabled = False
        self.positional_names = positional_names  # the backbone's forward(), to bind *args
        self.cache_name = "past_key_values"  # what the backbone's forward calls its KV cache
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.hide_cache = False  # set by the pre-hook for the forward hook of the same call

    def extra_repr(self) -> str:
        return f"active={self.active!r}, disabled={self.disabled}"


# ----------------------------------------------------------------------------- model level


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformers backbone the prefix is injected into (``model.base_model``)."""
    return getattr(model, "base_model", model)


def kv_shape(config: Any) -> KVShape:
    """Layers and per-layer KV geometry from a transformers config, as peft computes them
    (``_prepare_prompt_learning_config``): GQA models cache ``num_key_value_heads`` heads."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"prefix tuning: {config.model_type!r} is an encoder-decoder model; peftlab's prefix "
            "tuning supports decoder-only and encoder-only models")

    def first(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        raise ValueError(f"prefix tuning: the {type(config).__name__} has none of {names}")

    num_layers = first("num_hidden_layers", "n_layer", "num_layers")
    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    kv_heads = getattr(config, "num_key_value_heads", None)
    if not kv_heads:
        return KVShape(num_layers, heads, hidden // heads)
    # Heterogeneous models (Gemma 4 style) give some layers other KV shapes; peft sizes the
    # prefix for the widest and skips or slices layers. We refuse them instead.
    per_layer = getattr(config, "per_layer_config", None)
    layers = [per_layer[i] for i in range(num_layers)] if per_layer is not None else [config]
    shapes = {(getattr(c, "num_key_value_heads", None) or kv_heads,
               getattr(c, "head_dim", None) or hidden // heads) for c in layers}
    if len(shapes) > 1 or getattr(config, "global_head_dim", None):
        raise NotImplementedError(
            f"prefix tuning: {config.model_type!r} has attention layers with different KV shapes "
            f"({sorted(shapes)}); not supported")
    return KVShape(num_layers, *shapes.pop())


def adapters_of(model: nn.Module) -> PrefixAdapters | None:
    adapters = getattr(backbone_of(model), ATTR, None)
    return adapters if isinstance(adapters, PrefixAdapters) else None


def adapter_names(model: nn.Module) -> list[str]:
    adapters = adapters_of(model)
    return list(adapters) if adapters is not None else []


def prefix_encoder(model: nn.Module, adapter_name: str | None = None) -> PrefixEncoder:
    """The active (or the named) adapter's encoder."""
    adapters = _require(model)
    name = adapter_name or adapters.active
    if name not in adapters:
        raise ValueError(f"unknown prefix adapter {name!r}; the model has {list(adapters)}")
    return adapters[name]


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig,
                        adapter_name: str = "default") -> None:
    """Add a prefix adapter, freeze everything else, and make it the active, trainable one."""
    cfg.validate("method")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    backbone = backbone_of(model)
    params = inspect.signature(backbone.forward).parameters
    cache_name = cache_keyword(backbone)
    if cache_name is None or "attention_mask" not in params:
        raise NotImplementedError(
            f"prefix tuning: {type(backbone).__name__}.forward takes no KV cache "
            "(cache/past_key_values) or no attention_mask, so a prefix cannot be injected")
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("prefix tuning does not work with gradient checkpointing "
                         "(transformers drops the KV cache in checkpointed layers)")
    shape = kv_shape(model.config)
    if cfg.modules_to_save:
        peft_format.find_modules_to_save(model, cfg.modules_to_save)  # fail before touching the model
    adapters = adapters_of(model)
    if adapters is None:
        positional = [p.name for p in params.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        adapters = PrefixAdapters(positional)
        adapters.cache_name = cache_name
        setattr(backbone, ATTR, adapters)
        adapters.handles = [
            backbone.register_forward_pre_hook(_inject_prefix, with_kwargs=True),
            backbone.register_forward_hook(_hide_prefix_cache),
        ]
    if adapter_name in adapters:
        raise ValueError(f"prefix adapter {adapter_name!r} already exists; pick another name")
    ref = backbone.get_input_embeddings().weight
    encoder = PrefixEncoder(cfg.num_virtual_tokens, shape, cfg.prefix_projection,
                            cfg.encoder_hidden_size)
    encoder.modules_to_save = list(cfg.modules_to_save) if cfg.modules_to_save else None
    adapters[adapter_name] = encoder.to(ref.device)  # fp32 even on a bf16 model, as trainables
    set_adapter(model, adapter_name)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter; only its parameters are trainable."""
    adapters = _require(model)
    if name not in adapters:
        raise ValueError(f"unknown prefix adapter {name!r}; the model has {list(adapters)}")
    model.requires_grad_(False)
    adapters[name].requires_grad_(True)
    if adapters[name].modules_to_save:
        for module in peft_format.find_modules_to_save(model, adapters[name].modules_to_save).values():
            module.requires_grad_(True)
    adapters.active = name


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes the pure base output (e.g. a frozen reference
    policy for DPO) without copying it. Do not switch inside one ``generate`` call."""
    adapters = _require(model)
    previous = adapters.disabled
    adapters.disabled = True
    try:
        yield
    finally:
        adapters.disabled = previous


def remove_prefix_tuning(model: nn.Module) -> nn.Module:
    """Take the hook and every prefix adapter off: the plain transformers model again
    (its parameters stay frozen)."""
    adapters = _require(model)
    for handle in adapters.handles:
        handle.remove()
    delattr(backbone_of(model), ATTR)
    return model


def _require(model: nn.Module) -> PrefixAdapters:
    adapters = adapters_of(model)
    if adapters is None:
        raise ValueError(f"{type(model).__name__} has no prefix adapters; "
                         "call apply_prefix_tuning first")
    return adapters


# ----------------------------------------------------------------------------- the hook


def _inject_prefix(backbone: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Forward pre-hook on the backbone: put the prefix into the cache, widen the mask."""
    adapters: PrefixAdapters = getattr(backbone, ATTR)
    adapters.hide_cache = False
    if adapters.disabled or adapters.active is None:
        return None
    encoder: PrefixEncoder = adapters[adapters.active]
    n = encoder.num_virtual_tokens
    if len(args) > len(adapters.positional_names):
        raise TypeError(f"{type(backbone).__name__}: too many positional arguments")
    kwargs = {**dict(zip(adapters.positional_names, args, strict=False)), **kwargs}
    if backbone.training and any(getattr(m, "gradient_checkpointing", False)
                                 for m in backbone.modules()):
        raise ValueError("prefix tuning does not work with gradient checkpointing")

    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        raise ValueError("prefix tuning needs input_ids or inputs_embeds")
    batch_size, device = tokens.shape[0], tokens.device

    past = pop_cache(kwargs)  # the caller may use either spelling; the backbone gets its own
    if past is not None and not isinstance(past, DynamicCache):
        raise TypeError(f"prefix tuning supports DynamicCache only, got {type(past).__name__}")
    if past is None or past.get_seq_length() == 0:
        # Fill the caller's empty cache in place (generate keeps its own reference to it).
        cache = past if past is not None else DynamicCache(config=backbone.config)
        dtype = _compute_dtype(backbone, device)
        for layer_idx, (key, value) in enumerate(encoder.key_values(batch_size, dtype)):
            cache.update(key.to(device), value.to(device), layer_idx)
        # A caller that asked for no cache must not get ours back: some models (Llama) return
        # any cache they were given, and generate(use_cache=False) would then feed it back.
        adapters.hide_cache = past is None and kwargs.get("use_cache") is False
        past = cache
    # else: a later decoding step; the cache already starts with the prefix.
    kwargs[adapters.cache_name] = past

    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError("prefix tuning needs a 2D attention_mask (batch, tokens) over the "
                             f"real tokens, got {got}")
        ones = mask.new_ones(mask.shape[0], n)
        kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return (), kwargs


def _hide_prefix_cache(backbone: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook: drop the cache the pre-hook created when the call had ``use_cache=False``."""
    adapters: PrefixAdapters = getattr(backbone, ATTR)
    if adapters.hide_cache and output_cache(output) is not None:
        setattr(output, output_cache_name(output), None)
    adapters.hide_cache = False


def _compute_dtype(backbone: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention will see for the real keys: autocast's, else the stored weights'
    (the prefix parameters themselves stay fp32 on a bf16 model)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return backbone.get_input_embeddings().weight.dtype


# ----------------------------------------------------------------------------- peft format


def save_prefix_tuning(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write ``adapter_name`` as peft does in ``save_pretrained``: the flat (projected) prefix
    under ``prompt_embeddings`` (+ modules_to_save) and ``inference_mode: true``. The projection
    MLP itself is not saved (peft does not either), so it cannot be trained further after
    loading. A SEQ_CLS adapter needs its head in modules_to_save for peft to load it."""
    adapters = _require(model)
    if adapter_name not in adapters:
        raise ValueError(f"no prefix adapter {adapter_name!r} to save; "
                         f"the model has {list(adapters)}")
    encoder: PrefixEncoder = adapters[adapter_name]
    with torch.no_grad():
        flat = encoder()
    shape = encoder.shape
    config = {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "task_type": task_type,
        "inference_mode": True,
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "token_dim": shape.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": shape.num_heads,
        "num_layers": shape.num_layers,
        "prefix_projection": encoder.transform is not None,
        "encoder_hidden_size": (encoder.transform[0].out_features if encoder.transform is not None
                                else shape.token_dim),
        "modules_to_save": encoder.modules_to_save,
    }
    tensors = {WEIGHTS_KEY: flat, **modules_to_save_tensors(model, encoder.modules_to_save)}
    peft_format.write_adapter(directory, config, tensors)


def load_prefix_tuning(model: nn.Module, directory: str | PathLike,
                       adapter_name: str = "default") -> PrefixTuningConfig:
    """Load a peft (or peftlab) prefix-tuning adapter into ``model`` and make it active.

    The file holds the flat prefix, so the adapter is loaded without projection MLP (as peft
    does in inference mode); the returned config says ``prefix_projection=False``."""
    raw, config_path = _read_config(directory)
    shape = kv_shape(model.config)
    expected = {"num_layers": shape.num_layers, "token_dim": shape.token_dim,
                "num_attention_heads": shape.num_heads}
    for key, value in expected.items():
        if raw.get(key) is not None and raw[key] != value:
            raise ValueError(f"{config_path}: key {key!r} is {raw[key]!r} but this "
                             f"{type(model).__name__} needs {value} (adapter for another model?)")
    to_save = raw.get("modules_to_save")
    if to_save is not None and not isinstance(to_save, list):
        raise ConfigError(f"{config_path}: key 'modules_to_save' must be a list of module names, "
                          f"got {to_save!r}")
    # peft's SEQ_CLS config repeats its defaults (["classifier", "score", "classifier", ...]).
    to_save = list(dict.fromkeys(to_save)) if to_save else None
    cfg = PrefixTuningConfig(num_virtual_tokens=raw["num_virtual_tokens"], modules_to_save=to_save)
    cfg.validate(str(config_path))

    tensors, weights_path = peft_format.read_weights(directory)
    if WEIGHTS_KEY not in tensors:
        raise ValueError(f"{weights_path}: missing key {WEIGHTS_KEY!r}")
    if cfg.modules_to_save:  # the names must match this model's modules: a config problem
        try:
            peft_format.find_modules_to_save(model, cfg.modules_to_save)
        except ValueError as exc:
            raise ValueError(f"{config_path}: key 'modules_to_save': {exc}") from None
    extra = {k: v for k, v in tensors.items() if k != WEIGHTS_KEY}
    pairs = peft_format.match_modules_to_save(model, cfg.modules_to_save, extra, weights_path,
                                              repr(WEIGHTS_KEY), SAVE_PREFIX)
    flat = tensors[WEIGHTS_KEY]
    want = (cfg.num_virtual_tokens, shape.num_layers * 2 * shape.token_dim)
    if tuple(flat.shape) != want:
        raise ValueError(f"{weights_path}: key {WEIGHTS_KEY!r} has shape {tuple(flat.shape)}, "
                         f"the model expects {want}")

    apply_prefix_tuning(model, cfg, adapter_name)
    with torch.no_grad():
        prefix_encoder(model, adapter_name).embedding.weight.copy_(flat)
        for param, tensor in pairs:
            param.copy_(tensor)
    return cfg


def _read_config(directory: str | PathLike) -> tuple[dict[str, Any], Path]:
    path = Path(directory) / peft_format.CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config found "
                                "(expected a peft adapter directory)")
    raw = read_json(path)
    if raw.get("peft_type") != PEFT_TYPE:
        raise ConfigError(f"{path}: key 'peft_type' is {raw.get('peft_type')!r}; "
                          f"expected {PEFT_TYPE!r}")
    n = raw.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{path}: key 'num_virtual_tokens' must be an integer >= 1, got {n!r}")
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise ConfigError(f"{path}: key 'num_transformer_submodules' = "
                          f"{raw['num_transformer_submodules']!r} (encoder-decoder) "
                          "is not supported")
    return raw, path


register(Method(name="prefix_tuning", config_cls=PrefixTuningConfig, apply=apply_prefix_tuning,
                save=save_prefix_tuning, load=load_prefix_tuning, peft_type=PEFT_TYPE,
                present=lambda m: adapters_of(m) is not None, virtual_tokens=True))
