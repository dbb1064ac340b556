"""Partial fine-tuning: ``freeze`` (top-k blocks + named modules + the task head) and
``feature_extraction`` (a linear probe: only the task head trains).

Nothing is injected: the chosen base parameters are simply left trainable and everything
else gets ``requires_grad=False``. Because the trained tensors *are* base weights, the two
methods change the model in place and keep one "adapter" (``adapter_name`` is accepted for
the common signature only).

The task head is the top-level ``lm_head`` / ``classifier`` / ``score`` / ``qa_outputs``
module of the transformers model, nothing deeper:

* BERT ``*ForSequenceClassification``: ``classifier`` only. The pooler is pretrained encoder
  weight, so a linear probe keeps it frozen (add ``trainable_modules: [pooler]`` to train it).
* Tied LM heads (GPT-2, SmolLM2, any ``tie_word_embeddings=True`` model): the head's weight IS
  the input embedding matrix, so training the head trains the embeddings too (one tensor,
  saved under its first name, e.g. ``model.embed_tokens.weight``). We keep that rather than
  untie, which would change the architecture and the saved format; set ``train_head: false``
  to keep the tied matrix frozen.
* The final norm (``model.norm``, ``transformer.ln_f``) sits outside the blocks and is frozen
  unless named in ``trainable_modules``.

On-disk format (peftlab's own; peft has no such method), in the adapter directory:

* ``adapter_config.json``: ``{"peft_type": "PEFTLAB_FREEZE", "method": "freeze" |
  "feature_extraction", "trainable_layers", "trainable_modules", "train_head",
  "base_model_name_or_path", "task_type"}``. ``method_for_adapter_dir`` picks ``freeze`` by
  that peft_type; a feature-extraction save is a freeze save (0 layers + head), so it is
  loaded by ``freeze`` and the ``feature_extraction`` Method has no peft_type of its own.
* ``adapter_model.safetensors``: the trained tensors only, keys = the model's own parameter
  names (``model.layers.1.mlp.down_proj.weight``, ``classifier.bias``, ...). Loading applies
  the config to a fresh base and requires exactly those keys.

The helpers for peftlab's own formats (config read/write) live here and are reused by
``full`` and ``adapter``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.config import ConfigError
from peftlab.files import read_safetensors
from peftlab.methods import peft_format
from peftlab.methods.registry import Method, register
from peftlab.models.targets import block_index

PEFT_TYPE = "PEFTLAB_FREEZE"
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")

# The config the method was applied with, kept on the model so ``save`` (which only gets the
# model) knows what to write. A plain instance attribute: it survives copy.deepcopy.
CONFIG_ATTR = "peftlab_method_config"


@dataclass
class FreezeConfig:
    """Which base parameters train; everything else is frozen.

    trainable_layers: the top-k transformer blocks (highest ``block_index``), 0 for none.
    trainable_modules: extra modules or parameters; a list matches a full name or a suffix
      after "." (as peft's target_modules, e.g. ["norm", "lm_head"]), a str is a regex that
      must fullmatch a module or parameter name.
    train_head: also train the task head (see the module docstring for tied LM heads).
    """

    trainable_layers: int = 2
    trainable_modules: str | list[str] | None = None
    train_head: bool = True

    def validate(self, where: str) -> None:
        k = self.trainable_layers
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"{where}.trainable_layers must be an integer >= 0, got {k!r}")
        _check_spec(self.trainable_modules, f"{where}.trainable_modules")
        if not isinstance(self.train_head, bool):
            raise ConfigError(f"{where}.train_head must be true or false, got {self.train_head!r}")


@dataclass
class FeatureExtractionConfig:
    """No options: the base is frozen and only the task head trains (a linear probe)."""

    def validate(self, where: str) -> None:
        pass

    def as_freeze(self) -> FreezeConfig:
        return FreezeConfig(trainable_layers=0, trainable_modules=None, train_head=True)


# ----------------------------------------------------------------------------- selection


def _check_spec(spec: Any, key: str) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        if not spec:
            raise ConfigError(f"{key} must not be an empty string")
        try:
            re.compile(spec)
        except re.error as err:
            raise ConfigError(f"{key}={spec!r} is not a valid regex: {err}") from None
        return
    if not isinstance(spec, list) or not spec or not all(isinstance(s, str) and s for s in spec):
        raise ConfigError(f"{key} must be a regex or a non-empty list of module names, got {spec!r}")


def select_parameters(model: nn.Module, spec: str | list[str], key: str) -> dict[str, nn.Parameter]:
    """Parameters whose name, or the name of a module holding them, matches ``spec``.

    A list entry matches a full name or a suffix after "." (each entry must match something,
    so typos fail loudly); a str is a regex that must fullmatch. Tied parameters are matched
    under every name they have (``lm_head`` finds a head tied to the embeddings) and returned
    once, under ``named_parameters()``'s name.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    entries = [spec] if isinstance(spec, str) else list(spec)
    found: dict[str, nn.Parameter] = {}
    for entry in entries:
        hit = False
        for name, p in model.named_parameters(remove_duplicate=False):
            parts = name.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if isinstance(spec, str):
                ok = any(re.fullmatch(entry, q) for q in prefixes)
            else:
                ok = any(q == entry or q.endswith("." + entry) for q in prefixes)
            if ok:
                found[canonical[id(p)]] = p
                hit = True
        if not hit:
            raise ValueError(f"{key}: {entry!r} matches no module or parameter of "
                             f"{type(model).__name__}")
    return found


def task_head(model: nn.Module) -> dict[str, nn.Module]:
    """The top-level task head module(s) by name (empty if the model has none)."""
    return {n: m for n, m in model.named_children() if n in HEAD_NAMES}


def block_indices(model: nn.Module) -> list[int]:
    """Sorted indices of the transformer blocks that hold parameters."""
    return sorted({i for n, _ in model.named_parameters() if (i := block_index(n)) is not None})


def _freeze_selection(model: nn.Module, cfg: FreezeConfig, method: str) -> dict[str, nn.Parameter]:
    """The parameters ``cfg`` trains, by ``named_parameters()`` name (the save keys)."""
    model_name = type(model).__name__
    selected: dict[str, nn.Parameter] = {}
    if cfg.trainable_layers:
        blocks = block_indices(model)
        if not blocks:
            raise ValueError(f"method.trainable_layers={cfg.trainable_layers}: {model_name} has no "
                             "recognisable transformer blocks (module names like 'layers.<i>', "
                             "'layer.<i>' or 'h.<i>')")
        if cfg.trainable_layers > len(blocks):
            raise ValueError(f"method.trainable_layers={cfg.trainable_layers} exceeds the "
                             f"{len(blocks)} transformer blocks of {model_name}")
        top = set(blocks[-cfg.trainable_layers:])
        selected.update({n: p for n, p in model.named_parameters() if block_index(n) in top})
    if cfg.trainable_modules is not None:
        selected.update(select_parameters(model, cfg.trainable_modules, "method.trainable_modules"))
    if cfg.train_head:
        heads = task_head(model)
        if not heads:
            hint = ("load the model with a head (e.g. kind='sequence_classification')"
                    if method == "feature_extraction" else "set method.train_head=false")
            raise ValueError(f"{method}: {model_name} has no task head (a top-level "
                             f"{' / '.join(HEAD_NAMES)} module); {hint}")
        selected.update(select_parameters(model, list(heads), "method.train_head"))
    if not selected:
        raise ValueError(f"{method}: nothing to train (trainable_layers=0, no trainable_modules, "
                         "train_head=false)")
    return selected


def _apply(model: nn.Module, cfg: FreezeConfig, method: str) -> None:
    cfg.validate("method")
    selected = _freeze_selection(model, cfg, method)  # fails before touching the model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in selected.values():
        p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, cfg)


def apply_freeze(model: nn.Module, cfg: FreezeConfig, adapter_name: str = "default") -> None:
    """Leave only the top-k blocks, ``trainable_modules`` and (optionally) the head trainable."""
    _apply(model, cfg, "freeze")


def apply_feature_extraction(model: nn.Module, cfg: FeatureExtractionConfig | None = None,
                             adapter_name: str = "default") -> None:
    """Freeze the whole base; only the task head trains."""
    _apply(model, (cfg or FeatureExtractionConfig()).as_freeze(), "feature_extraction")


def applied_config(model: nn.Module, cls: type, method: str) -> Any:
    cfg = getattr(model, CONFIG_ATTR, None)
    if not isinstance(cfg, cls):
        raise ValueError(f"{type(model).__name__} has no {method} config; apply {method} "
                         "(or load a saved one) before saving")
    return cfg


# ----------------------------------------------------------------------------- own formats


def save_freeze(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write the trained tensors (the config's selection, by parameter name) + the config."""
    cfg = applied_config(model, FreezeConfig, "freeze")
    tensors = dict(_freeze_selection(model, cfg, "freeze"))
    is_probe = cfg == FeatureExtractionConfig().as_freeze()
    config = {
        "peft_type": PEFT_TYPE,
        "method": "feature_extraction" if is_probe else "freeze",
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
        **asdict(cfg),
    }
    peft_format.write_adapter(directory, config, tensors)


def load_freeze(model: nn.Module, directory: str | PathLike,
                adapter_name: str = "default") -> FreezeConfig:
    """Apply the saved config to ``model`` (a fresh base) and load the trained tensors."""
    cfg, config_path = peft_format.read_method_config(directory, PEFT_TYPE, FreezeConfig)
    path = Path(directory) / peft_format.WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: freeze weights not found")
    tensors = read_safetensors(path)
    expected = _freeze_selection(model, cfg, "freeze")
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{path}: unexpected key {key!r} (not a parameter that {config_path} "
                             "makes trainable in this model)")
    for key in expected:
        if key not in tensors:
            raise ValueError(f"{path}: missing key {key!r} (a parameter {config_path} makes trainable)")
    for key, param in expected.items():
        peft_format.copy_tensor(param, tensors[key], key, path)
    _apply(model, cfg, "freeze")
    return cfg


register(Method(name="freeze", config_cls=FreezeConfig, apply=apply_freeze, save=save_freeze,
                load=load_freeze, peft_type=PEFT_TYPE))
# Saves as PEFTLAB_FREEZE (see the module docstring), so no peft_type: the lookup stays unique.
register(Method(name="feature_extraction", config_cls=FeatureExtractionConfig,
                apply=apply_feature_extraction, save=save_freeze, load=load_freeze, peft_type=None))
