"""Reward modelling: a scalar head scores (prompt, response); Bradley-Terry loss on pairs.

The model is a sequence classifier with one output (``num_labels=1``). Its head is new,
so it must train along with the adapter: the builder adds it to LoRA's
``modules_to_save`` (as peft does for SEQ_CLS), which also saves it inside the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import RunConfig
from peftlab.data.preference import prepare_preference_data
from peftlab.data.sft import ensure_chat_template
from peftlab.evaluation.loss import score_pairs
from peftlab.models.lm import backbone_hidden_states
from peftlab.models.unpadded_encoder import encoder_class_logits
from peftlab.tasks.base import PreparedTask, TaskSpec, register_task
from peftlab.tasks.heads import load_head, save_head
from peftlab.tasks.pairwise import PairTask
from peftlab.tasks.reward.config import RewardConfig

HEAD_NAMES = ["classifier", "score"]  # transformers' sequence-classification heads (peft's list)
HEAD_FILE = "reward_head.safetensors"  # the head, when the method does not save it itself


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)`` (Llama 2's margin variant)."""
    return -F.logsigmoid(chosen - rejected - margin)


def sequence_scores(model: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """Head outputs ``[batch, num_labels]`` at each sequence's last real token.

    Decoder classifiers (a ``score`` head) are run on the backbone ourselves and read at
    the last attended position: transformers finds that position by searching for the pad
    token, which is wrong whenever pad == eos and the text ends with eos. Other models
    (encoders pooling their CLS token) use their own forward, or for BERT and RoBERTa the
    same on real tokens only (:mod:`~peftlab.models.unpadded_encoder`).
    """
    head = getattr(model, "score", None)
    if isinstance(head, nn.Module) and model.base_model is not model:
        hidden = backbone_hidden_states(model, input_ids, attention_mask)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * attention_mask).argmax(dim=1)  # left or right padding
        return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).float()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    logits = encoder_class_logits(model, inputs)  # BERT/RoBERTa: real tokens only
    return (model(**inputs).logits if logits is None else logits).float()


class RewardTask(PairTask):
    """Pairs of (chosen, rejected) sequences; loss = Bradley-Terry on their scalar scores."""

    peft_task_type = "SEQ_CLS"

    def __init__(self, pad_id: int, margin: float = 0.0):
        self.pad_id = pad_id
        self.margin = margin
        self.head_params: dict[str, nn.Parameter] = {}  # heads the task (not the method) saves

    def prepare_model(self, model: nn.Module) -> None:
        """Train the new head even when the method left it frozen (methods without
        ``modules_to_save``); :meth:`save` then writes it next to the adapter."""
        heads = {n: m for n, m in model.named_children() if n in HEAD_NAMES}
        if not heads:
            raise ValueError(f"{type(model).__name__} has no reward head (a child module named "
                             f"{' or '.join(HEAD_NAMES)})")
        self.head_params = {}
        for name, module in heads.items():
            for pname, p in module.named_parameters():
                if not p.requires_grad:
                    p.requires_grad_(True)
                    self.head_params[f"{name}.{pname}"] = p

    def save(self, model: nn.Module, directory: str | Path) -> None:
        if self.head_params:
            save_head(self.head_params, Path(directory) / HEAD_FILE)

    def restore(self, model: nn.Module, directory: str | Path) -> None:
        """The head :meth:`save` wrote, if any (``peftlab eval`` calls this)."""
        if (Path(directory) / HEAD_FILE).is_file():
            load_head(model, Path(directory) / HEAD_FILE)

    def scores(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        r = sequence_scores(model, batch["input_ids"], batch["attention_mask"])[:, 0]
        n = len(batch["ids"])
        return r[:n], r[n:]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        chosen, rejected = self.scores(model, batch)
        losses = bradley_terry_loss(chosen, rejected, self.margin + batch["margin"])
        return losses.sum(), len(batch["ids"])

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        """What :meth:`metrics` returns for ``examples``, known before any model runs."""
        return ["accuracy", "margin", "chosen_score", "rejected_score"] if examples else []

    @torch.no_grad()
    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Pairwise accuracy (chosen scored higher) and the mean score margin."""
        if not examples:
            return {}
        c, r = score_pairs(model, examples, self.collate, self.scores, batch_size, precision)
        return {"accuracy": round(float((c > r).float().mean()), 5),
                "margin": round(float((c - r).mean()), 5),
                "chosen_score": round(float(c.mean()), 5),
                "rejected_score": round(float(r.mean()), 5)}


def train_head_with_adapter(method_cfg: Any) -> None:
    """Make a new classification head trainable (and saved) with adapter methods.

    Adds the head names to ``modules_to_save`` where the method has that option (LoRA, as
    peft does for SEQ_CLS); other methods get the head from :meth:`RewardTask.prepare_model`.
    """
    if method_cfg is None or not hasattr(method_cfg, "modules_to_save"):
        return
    current = list(method_cfg.modules_to_save or [])
    method_cfg.modules_to_save = current + [m for m in HEAD_NAMES if m not in current]


def build_reward_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: reward`` (a one-output sequence classifier on preference pairs)."""
    ensure_chat_template(tokenizer)
    train, val, report = prepare_preference_data(cfg, tokenizer,
                                                 margin_field=cfg.task_config.margin_field)
    train_head_with_adapter(cfg.method)
    return PreparedTask(RewardTask(tokenizer.pad_token_id, cfg.task_config.margin), train, val, report,
                        model_kind="sequence_classification", model_kwargs={"num_labels": 1})


register_task(TaskSpec("reward", build_reward_task, RewardConfig))
