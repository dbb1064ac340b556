"""Prompt tuning (Lester et al. 2021): ``n`` trainable input embeddings before every input.

The whole adapter is one ``(n, hidden)`` matrix, ``model.prompt_encoder[name].embedding.weight``
(peft's in-memory name too). It is put in front of the embedded input by the hooks in
:mod:`peftlab.methods.virtual_tokens`; the model stays the transformers model.

Init: "random" draws N(0, 1) as ``nn.Embedding`` (peft's RANDOM); "text" copies the word
embeddings of ``init_text``'s tokens, repeated/truncated to ``n`` (peft's TEXT, same tokens:
``tokenizer(init_text)["input_ids"]``, special tokens included). The tokenizer is, in order:
``apply_prompt_tuning(..., tokenizer=tok)``, ``tokenizer_name_or_path`` from the config (any
spec :func:`peftlab.models.load_tokenizer` understands), or the model's own ``name_or_path``.

Files are peft's: ``adapter_model.safetensors`` holds ``prompt_embeddings`` (plus
``base_model.<module>.<param>`` for ``modules_to_save``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.config import ConfigError
from peftlab.methods import peft_format
from peftlab.methods import virtual_tokens as vt
from peftlab.methods.registry import Method, register

INITS = ("random", "text")


@dataclass
class PromptTuningConfig:
    """Prompt tuning hyper-parameters.

    modules_to_save: extra modules (e.g. a fresh classifier head) trained in full and saved
    with the adapter, as in peft (which adds "classifier"/"score" itself for SEQ_CLS).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    modules_to_save: list[str] | None = None

    def validate(self, where: str) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}.num_virtual_tokens must be an integer >= 1, got {n!r}")
        if self.init not in INITS:
            raise ConfigError(f"{where}.init: {self.init!r} is not one of {list(INITS)}")
        if self.init == "text" and not self.init_text:
            raise ConfigError(f"{where}.init_text must be set when init is 'text'")


class PromptEmbedding(nn.Module):
    """The ``(n, hidden)`` prompt vectors, kept in an ``nn.Embedding`` as in peft."""

    def __init__(self, num_virtual_tokens: int, token_dim: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)

    def forward(self) -> Tensor:
        return self.embedding.weight


def text_init_ids(tokenizer: Any, text: str, num_virtual_tokens: int) -> list[int]:
    """Token ids of ``text`` repeated/truncated to ``num_virtual_tokens`` (as peft does)."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text {text!r} tokenizes to no tokens")
    ids = ids * math.ceil(num_virtual_tokens / len(ids))
    return ids[:num_virtual_tokens]


def _resolve_tokenizer(model: nn.Module, cfg: PromptTuningConfig, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    from peftlab.models import load_tokenizer

    spec = cfg.tokenizer_name_or_path or getattr(model, "name_or_path", None)
    if not spec:
        raise ValueError("prompt tuning init 'text' needs a tokenizer: set "
                         "method.tokenizer_name_or_path or pass tokenizer= to apply_prompt_tuning")
    return load_tokenizer(spec)


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig, adapter_name: str = "default",
                        *, tokenizer: Any = None) -> None:
    """Add trainable virtual tokens to ``model`` in place; everything else is frozen."""
    cfg.validate("method")
    encoder = _new_encoder(model, cfg)
    if cfg.init == "text":
        ids = text_init_ids(_resolve_tokenizer(model, cfg, tokenizer), cfg.init_text,
                            cfg.num_virtual_tokens)
        words = vt.backbone_of(model).get_input_embeddings()
        with torch.no_grad():
            index = torch.tensor(ids, dtype=torch.long, device=words.weight.device)
            encoder.embedding.weight.copy_(words(index).float())
    _attach(model, encoder, cfg, adapter_name)


def _new_encoder(model: nn.Module, cfg: PromptTuningConfig) -> PromptEmbedding:
    words = vt.backbone_of(model).get_input_embeddings()
    encoder = PromptEmbedding(cfg.num_virtual_tokens, vt.token_dim(model))
    # fp32 master copy even on a bf16 model; the hook casts to the embeddings' dtype.
    return encoder.to(device=words.weight.device, dtype=torch.float32)


def _attach(model: nn.Module, encoder: PromptEmbedding, cfg: PromptTuningConfig,
            adapter_name: str) -> None:
    if cfg.modules_to_save:
        vt.modules_to_save_tensors(model, cfg.modules_to_save)  # fail before touching the model
    vt.attach(model, encoder, adapter_name)
    encoder.method_config = cfg
    extra = list(_modules(model, cfg))
    vt.freeze_all_but(model, [encoder, *extra])


def _modules(model: nn.Module, cfg: PromptTuningConfig) -> list[nn.Module]:
    from peftlab.methods.lora import _modules_to_save

    return list(_modules_to_save(model, cfg.modules_to_save).values()) if cfg.modules_to_save else []


def save_prompt_tuning(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write the adapter as peft does (``task_type`` None: inferred from the model class)."""
    encoder = _require(model, adapter_name)
    cfg: PromptTuningConfig = encoder.method_config
    config = vt.peft_prompt_config(model, peft_type="PROMPT_TUNING",
                                   num_virtual_tokens=cfg.num_virtual_tokens,
                                   base_model_name_or_path=base_model_name_or_path,
                                   task_type=task_type, modules_to_save=cfg.modules_to_save)
    # peft refuses TEXT without a tokenizer path; the init does not matter for loading anyway.
    text_init = cfg.init == "text" and bool(cfg.tokenizer_name_or_path)
    config.update({
        "prompt_tuning_init": "TEXT" if text_init else "RANDOM",
        "prompt_tuning_init_text": cfg.init_text if text_init else None,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path if text_init else None,
        "tokenizer_kwargs": None,
    })
    tensors = {"prompt_embeddings": encoder().detach().float()}
    tensors.update(vt.modules_to_save_tensors(model, config["modules_to_save"]))
    peft_format.write_adapter(directory, config, tensors)


def load_prompt_tuning(model: nn.Module, directory: str | PathLike,
                       adapter_name: str = "default") -> PromptTuningConfig:
    """Load a peft (or peftlab) prompt-tuning adapter; its vectors stay trainable."""
    raw, config_path = vt.read_prompt_config(directory, "PROMPT_TUNING", model)
    text = str(raw.get("prompt_tuning_init", "RANDOM")).upper() == "TEXT"
    cfg = PromptTuningConfig(
        num_virtual_tokens=raw["num_virtual_tokens"],
        init="text" if text else "random",
        init_text=raw.get("prompt_tuning_init_text") if text else None,
        tokenizer_name_or_path=raw.get("tokenizer_name_or_path"),
        modules_to_save=raw.get("modules_to_save") or None,
    )
    cfg.validate(str(config_path))
    prompts, extra, weights_path = vt.read_prompt_weights(directory, cfg.num_virtual_tokens, model)
    pairs = vt.check_modules_to_save(model, cfg.modules_to_save, extra, weights_path)
    encoder = _new_encoder(model, cfg)
    _attach(model, encoder, cfg, adapter_name)  # first: it refuses a model that has prompts
    with torch.no_grad():
        encoder.embedding.weight.copy_(prompts)
        for param, tensor in pairs:
            param.copy_(tensor)
    return cfg


def _require(model: nn.Module, adapter_name: str) -> PromptEmbedding:
    state = vt.hooks_of(model)
    if state is None or adapter_name not in state.encoders:
        raise ValueError(f"no prompt adapter {adapter_name!r} on {type(model).__name__}")
    encoder = state.encoders[adapter_name]
    if not isinstance(encoder, PromptEmbedding):
        raise ValueError(f"adapter {adapter_name!r} is a {type(encoder).__name__}, not prompt tuning")
    return encoder


register(Method(name="prompt_tuning", config_cls=PromptTuningConfig, apply=apply_prompt_tuning,
                save=save_prompt_tuning, load=load_prompt_tuning, peft_type="PROMPT_TUNING"))
