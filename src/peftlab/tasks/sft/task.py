"""Supervised fine-tuning of causal LMs with completion-only loss.

The LM head runs only on positions whose next token carries a label: prompt and
padding positions never materialise full-vocabulary logits (a large saving on CPU,
where the 49k-vocabulary projection is a big share of the step).

Packed rows (``data.packing``, peftlab.data.packing) carry ``position_ids`` that restart at
every example and reach the backbone without a 2D mask, so transformers masks attention
block-diagonally. Data preparation (:mod:`peftlab.tasks.sft.data`) also runs the optional
cleaning, augmentation, prompt templates, mixtures and replay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.config import ConfigError, RunConfig
from peftlab.data.collate import pad_collate
from peftlab.data.packing import collate_packed
from peftlab.data.sft import ensure_chat_template
from peftlab.evaluation.loss import evaluate_loss, perplexity
from peftlab.methods import get_method, has_virtual_tokens
from peftlab.models.lm import IGNORE_INDEX as IGNORE
from peftlab.models.lm import backbone_hidden_states, head_cross_entropy, right_padded
from peftlab.tasks.base import PreparedTask, Task, TaskSpec, halve_rows, register_task
from peftlab.tasks.sft.data import prepare_sft_data


class SFTTask(Task):
    """Next-token cross-entropy on labelled (assistant) tokens only."""

    def __init__(self, pad_id: int, chunk_size: int = 4096):
        self.pad_id = pad_id
        self.chunk_size = chunk_size

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if any("position_ids" in ex for ex in examples):  # packed rows (data.packing)
            return collate_packed(examples, self.pad_id)
        return pad_collate(examples, self.pad_id)

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def split_rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        # each row's loss reads only that row; the collated batch-level count is recounted
        parts = halve_rows({k: v for k, v in batch.items() if k != "num_target_tokens"})
        if len(parts) == 1:
            return [batch]
        if "num_target_tokens" in batch:
            for part in parts:
                part["num_target_tokens"] = int((part["labels"][:, 1:] != IGNORE).sum())
        return parts

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        n = int(keep.sum())
        positions = batch.get("position_ids")
        if positions is not None:  # packed: no 2D mask, so positions mark the examples
            if has_virtual_tokens(model):
                raise ValueError("packed batches (data.packing) can't be used with prompt "
                                 "tuning, p-tuning or prefix tuning: the virtual tokens would "
                                 "only precede the first example of each row; set "
                                 "data.packing: false")
            hidden = backbone_hidden_states(model, batch["input_ids"], None, position_ids=positions)
        else:
            mask = batch["attention_mask"]
            if right_padded(mask) and not has_virtual_tokens(model):
                mask = None  # the padded positions' outputs are never read (labels -100)
            hidden = backbone_hidden_states(model, batch["input_ids"], mask)
        hidden = hidden[:, :-1][keep]
        targets = labels[keep]
        head = model.get_output_embeddings()
        return head_cross_entropy(hidden, head, targets, self.chunk_size), n

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        """What :meth:`metrics` returns for ``examples``, known before any model runs."""
        sources = sorted({ex["source"] for ex in examples if "source" in ex})
        return [f"{kind}/{name}" for name in sources for kind in ("loss", "ppl")]

    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Per-source loss and perplexity (``loss/<name>``, ``ppl/<name>``; the Trainer logs
        them as ``val_loss/<name>``) when examples come from a ``data.mixture``.

        Costs one more pass over the validation set; nothing for single-source data.
        """
        by_source: dict[str, list[dict[str, Any]]] = {}
        for ex in examples:
            if "source" in ex:
                by_source.setdefault(ex["source"], []).append(ex)
        out: dict[str, float] = {}
        for name, group in sorted(by_source.items()):
            loss = evaluate_loss(model, self, group, batch_size, precision)
            out[f"loss/{name}"] = round(loss, 5)
            out[f"ppl/{name}"] = round(perplexity(loss), 3)
        return out


def build_sft_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: sft`` (a causal LM, chat-templated, completion-only loss)."""
    if cfg.data.packing and get_method(cfg.method_name).virtual_tokens:
        raise ConfigError(f"data.packing can't be used with method {cfg.method_name!r}: its "
                          "virtual tokens would only precede the first example of each packed row")
    ensure_chat_template(tokenizer)
    train, val, report = prepare_sft_data(cfg, tokenizer)
    return PreparedTask(SFTTask(pad_id=tokenizer.pad_token_id), train, val, report,
                        model_kind="causal_lm")


register_task(TaskSpec("sft", build_sft_task))
