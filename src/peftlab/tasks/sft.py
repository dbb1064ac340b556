"""Supervised fine-tuning of causal LMs with completion-only loss.

The LM head runs only on positions whose next token carries a label: prompt and
padding positions never materialise full-vocabulary logits (a large saving on CPU,
where the 49k-vocabulary projection is a big share of the step).

Packed rows (``data.packing``, peftlab.data.packing) carry ``position_ids`` that restart at
every example and reach the backbone without a 2D mask, so transformers masks attention
block-diagonally. Data preparation (:func:`prepare_sft_data`) also runs the optional
cleaning, augmentation and prompt templates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.collate import pad_collate
from peftlab.data.packing import collate_packed

IGNORE = -100


class SFTTask:
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

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        n = int(keep.sum())
        positions = batch.get("position_ids")
        if positions is not None:  # packed: no 2D mask, so positions mark the examples
            hidden = backbone_hidden_states(model, batch["input_ids"], None, position_ids=positions)
        else:
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
                           attention_mask: torch.Tensor | None,
                           position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states of a transformers causal LM without running its LM head.

    Packed rows (peftlab.data.packing) pass ``position_ids`` that restart at every example
    and ``attention_mask=None``: transformers then masks attention block-diagonally.
    """
    backbone = model.base_model if model.base_model is not model else None
    if backbone is None:
        raise TypeError(f"{type(model).__name__}: cannot find the transformer backbone "
                        "(expected a transformers *ForCausalLM model)")
    kwargs: dict[str, Any] = {}
    if position_ids is not None:
        if hasattr(model, "prompt_encoder") or hasattr(backbone, "prefix_encoder"):
            raise ValueError("packed batches (data.packing) can't be used with prompt tuning, "
                             "p-tuning or prefix tuning: the virtual tokens would only precede "
                             "the first example of each row; set data.packing: false")
        kwargs["position_ids"] = position_ids
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def build_sft_task(cfg, tokenizer):
    """Task builder for ``task: sft`` (a causal LM, chat-templated, completion-only loss)."""
    from peftlab.config import ConfigError
    from peftlab.data.sft import ensure_chat_template
    from peftlab.tasks import PreparedTask

    if cfg.data.packing and cfg.method_name in _VIRTUAL_TOKEN_METHODS:
        raise ConfigError(f"data.packing can't be used with method {cfg.method_name!r}: its "
                          "virtual tokens would only precede the first example of each packed row")
    ensure_chat_template(tokenizer)
    train, val, report = prepare_sft_data(cfg, tokenizer)
    return PreparedTask(SFTTask(pad_id=tokenizer.pad_token_id), train, val, report,
                        model_kind="causal_lm")


_VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")


def prepare_sft_data(cfg, tokenizer, model=None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, clean, split, augment, render, tokenize and pack the run's SFT data.

    Order matters: duplicates are removed before splitting (so copies can't straddle the
    split), leaking training rows after it, and augmentation sees only the remaining
    training rows. Only training examples are packed. ``model`` is needed only for
    ``data.augment`` with ``paraphrase`` or ``synonyms: embedding``; without it the model is
    loaded for that step. Returns (train examples, validation examples, data report).
    """
    from peftlab.data.readers import DataError, read_records
    from peftlab.data.splits import split_off

    data, seed = cfg.data, cfg.train.seed
    if not data.train:
        raise DataError("data.train: no training file given")
    records, read_report = read_records(data.train, on_error=data.on_error, max_rows=data.max_rows)
    report: dict[str, Any] = {"train_file": {"path": data.train, **_report_dict(read_report)}}
    train_rows = list(zip(read_report.row_numbers, records, strict=True))  # (file row, record)
    text_of = _prompt_answer_text(data)
    cleaning: dict[str, Any] = {}
    if _cleaning_on(data.clean):
        train_rows, cleaning["train"] = _clean(train_rows, cfg, tokenizer, text_of)
    if data.validation:
        val_records, val_report = read_records(data.validation, on_error=data.on_error)
        report["validation_file"] = {"path": data.validation, **_report_dict(val_report)}
        val_rows = list(zip(val_report.row_numbers, val_records, strict=True))
        if _cleaning_on(data.clean):
            val_rows, cleaning["validation"] = _clean(val_rows, cfg, tokenizer, text_of)
    else:
        train_rows, val_rows = split_off(train_rows, data.validation_split, seed)
    if data.clean.leakage and val_rows:
        from peftlab.data.clean import remove_leakage

        _, keep, cleaning["leakage"] = remove_leakage(
            [r for _, r in train_rows], [r for _, r in val_rows], data.clean, text_of, seed,
            [n for n, _ in train_rows], [n for n, _ in val_rows])
        train_rows = [train_rows[i] for i in keep]
    if cleaning:
        from peftlab.data.clean import summary

        report["cleaning"] = cleaning
        print(summary(cleaning))
    if data.augment.method != "none":
        train_rows, report["augmentation"] = _augment(train_rows, cfg, tokenizer, model)

    template = None
    if data.template is not None:
        from peftlab.data.templates import load_template

        template = load_template(data.template)
    train, train_stats = _build_examples(train_rows, tokenizer, data, template,
                                         cfg.train.max_length, data.train)
    val, val_stats = _build_examples(val_rows, tokenizer, data, template, cfg.train.max_length,
                                     data.validation or data.train)
    report["train"] = vars(train_stats)
    report["validation"] = vars(val_stats)
    if template is not None:
        report["template"] = template.name
    if data.packing and train:
        from peftlab.data.packing import pack_examples

        train, report["packing"] = pack_examples(train, cfg.train.max_length)
        p = report["packing"]
        print(f"packing: {p['examples']} training examples -> {p['packed_rows']} rows of <= "
              f"{p['max_length']} tokens ({p['fill']:.0%} full)")
    return train, val, report


def _build_examples(rows, tokenizer, data, template, max_length, source):
    from peftlab.data.sft import build_sft_examples

    records, numbers = [r for _, r in rows], [n for n, _ in rows]
    if template is None:
        return build_sft_examples(records, tokenizer, data, max_length, source=source,
                                  row_numbers=numbers)
    from peftlab.data.templates import build_template_examples

    return build_template_examples(records, tokenizer, data, template, max_length, source,
                                   row_numbers=numbers)


def _prompt_answer_text(data):
    """``record -> (prompt text, answer text)`` for cleaning; None for unreadable rows."""
    from peftlab.data.readers import DataError
    from peftlab.data.sft import record_to_messages

    def text_of(record):
        try:
            messages = record_to_messages(record, data, "row")
        except DataError:
            return None  # reported with its file and row when the examples are built
        return "\n".join(m["content"] for m in messages[:-1]), messages[-1]["content"]

    return text_of


def _cleaning_on(c) -> bool:
    return bool(c.normalize or c.dedup or c.near_dedup or c.min_tokens or c.max_tokens is not None
                or c.leakage)


def _clean(rows, cfg, tokenizer, text_of):
    from peftlab.data.clean import clean_rows

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    kept, keep, report = clean_rows([r for _, r in rows], cfg.data.clean, text_of, count_tokens,
                                    cfg.train.seed, [n for n, _ in rows])
    return [(rows[i][0], r) for i, r in zip(keep, kept, strict=True)], report


def _augment(rows, cfg, tokenizer, model):
    """Append augmented copies of the training rows (they keep their source's row number)."""
    from peftlab.data.augment import augment_rows

    data, aug = cfg.data, cfg.data.augment
    fields = aug.fields or [data.instruction_field, data.input_field, data.messages_field]
    if model is None and (aug.method == "paraphrase" or aug.synonyms == "embedding"):
        from peftlab.models import load_model

        model, _ = load_model(cfg.model)  # the base model, freed after this step
    new, sources, report = augment_rows([r for _, r in rows], aug, cfg.train.seed, fields,
                                        model=model, tokenizer=tokenizer)
    print(f"augmentation ({aug.method}): {report['rows_added']} new training rows from "
          f"{report['rows_in']}")
    return rows + [(rows[i][0], r) for i, r in zip(sources, new, strict=True)], report


def _report_dict(read_report) -> dict[str, Any]:
    return {"rows_read": read_report.rows_read, "rows_skipped": read_report.rows_skipped,
            "skipped": read_report.skipped}


def _register() -> None:
    from peftlab.tasks import register_task

    register_task("sft", build_sft_task)


_register()
