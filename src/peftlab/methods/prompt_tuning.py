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
from peftlab.methods import virtual_tokens as vt
from peftlab.methods.registry import Method, register
from peftlab.models import load_tokenizer

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
    vt.attach_prompts(model, encoder, cfg, adapter_name)


def _new_encoder(model: nn.Module, cfg: PromptTuningConfig) -> PromptEmbedding:
    return vt.on_embeddings_device(model, PromptEmbedding(cfg.num_virtual_tokens, vt.token_dim(model)))


def save_prompt_tuning(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write the adapter as peft does (``task_type`` None: inferred from the model class)."""
    encoder = vt.require_prompts(model, adapter_name, PromptEmbedding, "prompt tuning")
    cfg: PromptTuningConfig = encoder.method_config
    # peft refuses TEXT without a tokenizer path; the init does not matter for loading anyway.
    text_init = cfg.init == "text" and bool(cfg.tokenizer_name_or_path)
    vt.save_prompts(model, directory, encoder().detach().float(), peft_type="PROMPT_TUNING", cfg=cfg,
                    method_keys={
                        "prompt_tuning_init": "TEXT" if text_init else "RANDOM",
                        "prompt_tuning_init_text": cfg.init_text if text_init else None,
                        "tokenizer_name_or_path": cfg.tokenizer_name_or_path if text_init else None,
                        "tokenizer_kwargs": None,
                    },
                    base_model_name_or_path=base_model_name_or_path, task_type=task_type)


def load_prompt_tuning(model: nn.Module, directory: str | PathLike,
                       adapter_name: str = "default") -> PromptTuningConfig:
    """Load a peft (or peftlab) prompt-tuning adapter; its vectors stay trainable."""
    return vt.load_prompts(
        model, directory, "PROMPT_TUNING", _config_from_peft,
        lambda cfg: vt.attach_prompts(model, _new_encoder(model, cfg), cfg, adapter_name))


def _config_from_peft(raw: dict[str, Any]) -> PromptTuningConfig:
    text = str(raw.get("prompt_tuning_init", "RANDOM")).upper() == "TEXT"
    return PromptTuningConfig(
        num_virtual_tokens=raw["num_virtual_tokens"],
        init="text" if text else "random",
        init_text=raw.get("prompt_tuning_init_text") if text else None,
        tokenizer_name_or_path=raw.get("tokenizer_name_or_path"),
        modules_to_save=raw.get("modules_to_save") or None,
    )


register(Method(name="prompt_tuning", config_cls=PromptTuningConfig, apply=apply_prompt_tuning,
                save=save_prompt_tuning, load=load_prompt_tuning, peft_type="PROMPT_TUNING",
                present=lambda m: isinstance(vt.active_prompts(m), PromptEmbedding),
                virtual_tokens=True))
