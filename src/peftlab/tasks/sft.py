"""Supervised fine-tuning of causal LMs with completion-only loss.

The LM head runs only on positions whose next token carries a label: prompt and
padding positions never materialise full-vocabulary logits (a large saving on CPU,
where the 49k-vocabulary projection is a big share of the step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.collate import pad_collate

IGNORE = -100


class SFTTask:
    """Next-token cross-entropy on labelled (assistant) tokens only."""

    def __init__(self, pad_id: int, chunk_size: int = 4096):
        self.pad_id = pad_id
        self.chunk_size = chunk_size

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return pad_collate(examples, self.pad_id)

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        n = int(keep.sum())
        hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        hidden = hidden[:, :-1][keep]
        targets = labels[keep]
        head = model.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_size):
            logits = head(hidden[start:start + self.chunk_size]).float()
            total = total + F.cross_entropy(
                logits, targets[start:start + self.chunk_size], reduction="sum"
            )
        return total, n


def backbone_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of a transformers causal LM without running its LM head."""
    backbone = model.base_model if model.base_model is not model else None
    if backbone is None:
        raise TypeError(f"{type(model).__name__}: cannot find the transformer backbone "
                        "(expected a transformers *ForCausalLM model)")
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def build_sft_task(cfg, tokenizer):
    """Task builder for ``task: sft`` (a causal LM, chat-templated, completion-only loss)."""
    from peftlab.data.sft import ensure_chat_template
    from peftlab.tasks import PreparedTask

    ensure_chat_template(tokenizer)
    train, val, report = prepare_sft_data(cfg, tokenizer)
    return PreparedTask(SFTTask(pad_id=tokenizer.pad_token_id), train, val, report,
                        model_kind="causal_lm")


def prepare_sft_data(cfg, tokenizer) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, split, render and tokenize the run's SFT data; return examples and a report."""
    from peftlab.data.readers import DataError, read_records
    from peftlab.data.sft import build_sft_examples
    from peftlab.data.splits import split_off

    data = cfg.data
    if not data.train:
        raise DataError("data.train: no training file given")
    records, read_report = read_records(data.train, on_error=data.on_error, max_rows=data.max_rows)
    report: dict[str, Any] = {"train_file": {"path": data.train, **_report_dict(read_report)}}
    if data.validation:
        val_records, val_report = read_records(data.validation, on_error=data.on_error)
        report["validation_file"] = {"path": data.validation, **_report_dict(val_report)}
    else:
        records, val_records = split_off(records, data.validation_split, cfg.train.seed)
    train_rows = val_rows = None
    if data.validation:
        train_rows, val_rows = read_report.row_numbers, val_report.row_numbers
    train, train_stats = build_sft_examples(records, tokenizer, data, cfg.train.max_length,
                                            source=data.train, row_numbers=train_rows)
    val, val_stats = build_sft_examples(val_records, tokenizer, data, cfg.train.max_length,
                                        source=data.validation or data.train,
                                        row_numbers=val_rows)
    report["train"] = vars(train_stats)
    report["validation"] = vars(val_stats)
    return train, val, report


def _report_dict(read_report) -> dict[str, Any]:
    return {"rows_read": read_report.rows_read, "rows_skipped": read_report.rows_skipped,
            "skipped": read_report.skipped}


def _register() -> None:
    from peftlab.tasks import register_task

    register_task("sft", build_sft_task)


_register()
