"""``task: ppo``'s data: prompts read, split and encoded; the answers come from the policy."""

from __future__ import annotations

from typing import Any

from peftlab.config import RunConfig
from peftlab.data.preference import record_to_prompt
from peftlab.data.readers import DataError, read_records, skip_or_raise
from peftlab.data.sft import encode_prompt
from peftlab.data.splits import split_off


def prepare_prompts(cfg: RunConfig, tokenizer, max_new_tokens: int | None = None,
                    ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, split and encode the prompts; drop those leaving no room for ``max_new_tokens``
    (default: the ``ppo`` section's). Each example keeps its data ``row`` (GRPO's reward
    functions read its other columns, e.g. a problem's exact answer)."""
    data = cfg.data
    if not data.train:
        raise DataError("data.train: no training file given")
    records, rep = read_records(data.train, on_error=data.on_error, max_rows=data.max_rows)
    report: dict[str, Any] = {"train_file": {"path": data.train, "rows_read": rep.rows_read,
                                             "rows_skipped": rep.rows_skipped,
                                             "skipped": rep.skipped}}
    rows = rep.row_numbers
    if data.validation:
        val_records, val_rep = read_records(data.validation, on_error=data.on_error)
        val_rows = val_rep.row_numbers
        report["validation_file"] = {"path": data.validation, "rows_read": val_rep.rows_read,
                                     "rows_skipped": val_rep.rows_skipped,
                                     "skipped": val_rep.skipped}
    else:
        records, val_records = split_off(records, data.validation_split, cfg.train.seed)
        rows = val_rows = None
    if max_new_tokens is None:
        max_new_tokens = cfg.task_config.max_new_tokens
    room = cfg.train.max_length - max_new_tokens

    def encode(recs: list[dict], source: str, numbers: list[int] | None):
        stats = {"source": source, "rows": len(recs), "kept": 0, "dropped_invalid": 0,
                 "dropped_too_long": 0, "max_len": 0, "errors": []}
        out = []
        for i, record in enumerate(recs):
            where = f"{source}:{numbers[i] if numbers else i + 1}"
            try:
                messages = record_to_prompt(record, data, where)
            except DataError as exc:
                skip_or_raise(exc, data.on_error, stats["errors"])
                stats["dropped_invalid"] += 1
                continue
            ids = encode_prompt(messages, tokenizer)
            if len(ids) > room:
                stats["dropped_too_long"] += 1
                continue
            out.append({"input_ids": ids, "messages": messages, "row": record})
            stats["max_len"] = max(stats["max_len"], len(ids))
        stats["kept"] = len(out)
        return out, stats

    train, report["train"] = encode(records, data.train, rows)
    val, report["validation"] = encode(val_records, data.validation or data.train, val_rows)
    return train, val, report
