"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens made by a small encoder.

A trainable ``(n, hidden)`` embedding is passed through a reparameterisation network and the
result is prepended to the input (by the hooks in :mod:`peftlab.methods.virtual_tokens`). The
network is peft's ``PromptEncoder``, module for module, so state dicts transfer:

    mlp:   embedding -> Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d)   (always 2 hidden layers)
    lstm:  embedding -> biLSTM(d, h, encoder_num_layers, dropout) -> Linear(2h, 2h) ReLU Linear(2h, d)

What is saved (as in peft's ``save_pretrained``) is the encoder's *output*, the final prompt
vectors, under ``prompt_embeddings``; the encoder itself is a training-time device. Loading a
p-tuning adapter (ours or peft's) therefore gives an encoder in "inference mode": just the
embedding holding those vectors, no network. It stays trainable, so further training updates
the vectors directly (peft refuses to train a loaded prompt adapter at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.config import ConfigError
from peftlab.methods import virtual_tokens as vt
from peftlab.methods.registry import Method, register

ENCODER_TYPES = ("mlp", "lstm")


@dataclass
class PTuningConfig:
    """P-tuning hyper-parameters.

    encoder_hidden_size: None = the model's embedding width. encoder_num_layers and
    encoder_dropout are LSTM settings: the MLP has exactly 2 hidden layers and no dropout (as
    in peft, which silently ignores them; we reject other values instead).
    modules_to_save: extra modules trained in full and saved with the adapter, as in peft.
    """

    num_virtual_tokens: int = 20
    encoder_type: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    modules_to_save: list[str] | None = None

    def validate(self, where: str) -> None:
        for key in ("num_virtual_tokens", "encoder_num_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{key} must be an integer >= 1, got {value!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ConfigError(f"{where}.encoder_hidden_size must be an integer >= 1, got {h!r}")
        if self.encoder_type not in ENCODER_TYPES:
            raise ConfigError(f"{where}.encoder_type: {self.encoder_type!r} is not one of "
                              f"{list(ENCODER_TYPES)}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"{where}.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if self.encoder_type == "mlp" and self.encoder_num_layers != 2:
            raise ConfigError(f"{where}.encoder_num_layers: the mlp encoder always has 2 hidden "
                              f"layers (as in peft), got {self.encoder_num_layers}; use lstm to vary it")
        if self.encoder_type == "mlp" and self.encoder_dropout:
            raise ConfigError(f"{where}.encoder_dropout applies to the lstm encoder only; the mlp "
                              "encoder has no dropout (as in peft)")


class PromptEncoder(nn.Module):
    """peft's PromptEncoder: ``forward()`` maps the ``(n, d)`` embedding to the prompts.

    ``inference_mode=True`` builds the embedding only: it then holds final prompt vectors
    (what a saved adapter contains) and ``forward()`` returns them unchanged.
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, encoder_type: str = "mlp",
                 hidden_size: int | None = None, num_layers: int = 2, dropout: float = 0.0,
                 inference_mode: bool = False) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder_type = encoder_type
        self.inference_mode = inference_mode
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if inference_mode:
            return
        h = hidden_size or token_dim
        if encoder_type == "lstm":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=h, num_layers=num_layers,
                                     dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        elif encoder_type == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h),
                                          nn.ReLU(), nn.Linear(h, token_dim))
        else:
            raise ValueError(f"encoder_type {encoder_type!r} is not one of {list(ENCODER_TYPES)}")

    def forward(self) -> Tensor:
        x = self.embedding.weight
        if self.inference_mode:
            return x
        if self.encoder_type == "lstm":
            x = self.lstm_head(x.unsqueeze(0))[0][0]  # the sequence of n tokens, batch of one
        return self.mlp_head(x)


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig, adapter_name: str = "default") -> None:
    """Add a trainable prompt encoder to ``model`` in place; everything else is frozen."""
    cfg.validate("method")
    vt.attach_prompts(model, _new_encoder(model, cfg, inference_mode=False), cfg, adapter_name)


def _new_encoder(model: nn.Module, cfg: PTuningConfig, inference_mode: bool) -> PromptEncoder:
    encoder = PromptEncoder(cfg.num_virtual_tokens, vt.token_dim(model), cfg.encoder_type,
                            cfg.encoder_hidden_size, cfg.encoder_num_layers, cfg.encoder_dropout,
                            inference_mode=inference_mode)
    return vt.on_embeddings_device(model, encoder)


def save_p_tuning(
    model: nn.Module,
    directory: str | PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write the adapter as peft does: the encoder's output as ``prompt_embeddings``.

    The output is computed in eval mode (no LSTM dropout). ``task_type`` None: inferred from
    the model class.
    """
    encoder = vt.require_prompts(model, adapter_name, PromptEncoder, "p-tuning")
    cfg: PTuningConfig = encoder.method_config
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            prompts = encoder().float()
    finally:
        encoder.train(was_training)
    vt.save_prompts(model, directory, prompts, peft_type="P_TUNING", cfg=cfg,
                    method_keys={
                        "encoder_reparameterization_type": cfg.encoder_type.upper(),
                        "encoder_hidden_size": cfg.encoder_hidden_size or vt.token_dim(model),
                        "encoder_num_layers": cfg.encoder_num_layers,
                        "encoder_dropout": cfg.encoder_dropout,
                    },
                    base_model_name_or_path=base_model_name_or_path, task_type=task_type)


def load_p_tuning(model: nn.Module, directory: str | PathLike,
                  adapter_name: str = "default") -> PTuningConfig:
    """Load a peft (or peftlab) p-tuning adapter: its final prompt vectors, no encoder."""
    return vt.load_prompts(
        model, directory, "P_TUNING", _config_from_peft,
        lambda cfg: vt.attach_prompts(model, _new_encoder(model, cfg, inference_mode=True), cfg,
                                      adapter_name))


def _config_from_peft(raw: dict[str, Any]) -> PTuningConfig:
    encoder_type = str(raw.get("encoder_reparameterization_type", "MLP")).lower()
    lstm = encoder_type == "lstm"
    return PTuningConfig(
        num_virtual_tokens=raw["num_virtual_tokens"],
        encoder_type=encoder_type,
        encoder_hidden_size=raw.get("encoder_hidden_size"),
        encoder_num_layers=raw.get("encoder_num_layers", 2) if lstm else 2,
        encoder_dropout=float(raw.get("encoder_dropout") or 0.0) if lstm else 0.0,
        modules_to_save=raw.get("modules_to_save") or None,
    )


register(Method(name="p_tuning", config_cls=PTuningConfig, apply=apply_p_tuning,
                save=save_p_tuning, load=load_p_tuning, peft_type="P_TUNING",
                present=lambda m: isinstance(vt.active_prompts(m), PromptEncoder),
                virtual_tokens=True))
