"""``task: kto``'s data: unpaired (prompt, completion, label) rows, or preference pairs split in
two unpaired examples (the chosen answer desirable, the rejected one undesirable).

Row shapes (field names from ``data.prompt_field/completion_field/label_field`` and, for
pairs, ``data.chosen_field/rejected_field``):

* ``{"prompt": ..., "completion": ..., "label": true|false}`` as in TRL's unpaired format;
  the prompt is text or chat messages, the completion text or one assistant message, the
  label a boolean (also 1/0 or "true"/"false", as CSV cells hold it);
* any preference row ``task: dpo`` accepts (HH-RLHF transcripts included): one desirable and
  one undesirable example, which share a ``pair`` number (for the pairwise validation
  metric) but are batched independently, as unpaired data is.

An example keeps the prompt's and the answer's tokens apart, so a batch can also pair each
prompt with another example's answer: KTO's estimate of the KL reference point.
"""

from __future__ import annotations

from typing import Any

from peftlab.config import DataConfig
from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.preference import (
    Messages,
    encode_exchange,
    read_split_records,
    record_to_pair,
    record_to_prompt,
)
from peftlab.data.readers import DataError, RowStats
from peftlab.data.sft import ensure_chat_template

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def desirable(value: Any, key: str, where: str) -> bool:
    """A row's label as a bool; anything but a clear yes/no is an error naming the row."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{where}: field {key!r} must be true or false (desirable or not), "
                    f"got {value!r}")


def _completion(raw: Any, key: str, where: str) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], dict) \
            and raw[0].get("role") == "assistant" and isinstance(raw[0].get("content"), str):
        raw = raw[0]["content"]
    if not isinstance(raw, str):
        raise DataError(f"{where}: field {key!r} must be the answer (text or one assistant "
                        f"message), got {type(raw).__name__}")
    if not raw.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return raw


def record_to_unpaired(record: dict[str, Any], cfg: DataConfig, where: str,
                       ) -> list[tuple[Messages, str, bool]]:
    """One row -> its (prompt, answer, desirable) examples: one, or two for a preference pair."""
    if record.get(cfg.completion_field) is None and record.get(cfg.chosen_field) is not None:
        pair = record_to_pair(record, cfg, where)
        return [(pair.prompt, pair.chosen, True), (pair.prompt, pair.rejected, False)]
    for key in (cfg.completion_field, cfg.label_field):
        if record.get(key) is None:
            fields = ", ".join(str(k) for k in record) or "no fields"
            raise DataError(f"{where}: field {key!r} is missing (an unpaired row needs "
                            f"{cfg.prompt_field!r}, {cfg.completion_field!r} and "
                            f"{cfg.label_field!r}; a paired one {cfg.chosen_field!r} and "
                            f"{cfg.rejected_field!r}; the row has: {fields})")
    if record.get(cfg.prompt_field) is None:
        raise DataError(f"{where}: field {cfg.prompt_field!r} is missing")
    prompt = record_to_prompt(record, cfg, where)
    answer = _completion(record[cfg.completion_field], cfg.completion_field, where)
    return [(prompt, answer, desirable(record[cfg.label_field], cfg.label_field, where))]


def split_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens): the answer is the labelled run; what follows it (e.g.
    the template's newline after the end-of-turn marker) is dropped, it scores nothing."""
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return input_ids[:start], input_ids[start:end]


def build_kto_examples(records: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig,
                       max_length: int, source: str, row_numbers: list[int] | None = None,
                       first_pair: int = 0) -> tuple[list[dict[str, Any]], RowStats]:
    """Rows -> ``{"prompt_ids", "completion_ids", "label", "pair"}`` (pair: -1 if unpaired).

    Examples longer than ``max_length`` are dropped, not cut (a cut answer is another answer).
    """
    ensure_chat_template(tokenizer)
    stats = RowStats(source=source, max_length=max_length, rows=len(records))
    examples: list[dict[str, Any]] = []
    pair = first_pair
    for i, record in enumerate(records):
        where = f"{source}:{row_numbers[i] if row_numbers else i + 1}"
        try:
            items = record_to_unpaired(record, cfg, where)
        except DataError as exc:
            stats.invalid(exc, cfg.on_error)
            continue
        encoded = []
        for prompt, answer, label in items:
            enc = encode_exchange(prompt, answer, tokenizer)
            prompt_ids, completion_ids = split_answer(enc["input_ids"], enc["labels"])
            encoded.append((prompt_ids, completion_ids, label))
        if any(len(p) + len(c) > max_length for p, c, _ in encoded):
            stats.dropped_too_long += 1
            continue
        if any(not c or not p for p, c, _ in encoded):
            stats.dropped_no_target += 1
            continue
        for prompt_ids, completion_ids, label in encoded:
            examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                             "label": label, "pair": pair if len(encoded) == 2 else -1})
            stats.tokens += len(prompt_ids) + len(completion_ids)
            stats.max_len = max(stats.max_len, len(prompt_ids) + len(completion_ids))
        pair += len(encoded) == 2
    stats.kept = len(examples)
    stats.mean_len = stats.tokens / stats.kept if stats.kept else 0.0
    return examples, stats


def prepare_kto_data(cfg, tokenizer) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, split (by row, so both answers of a pair land on the same side) and tokenize."""
    data = cfg.data
    records, val_records, train_rows, val_rows, report = read_split_records(cfg)
    train, train_stats = build_kto_examples(records, tokenizer, data, cfg.train.max_length,
                                            data.train, train_rows)
    first_pair = 1 + max((ex["pair"] for ex in train), default=-1)
    val, val_stats = build_kto_examples(val_records, tokenizer, data, cfg.train.max_length,
                                        data.validation or data.train, val_rows, first_pair)
    report["train"], report["validation"] = vars(train_stats), vars(val_stats)
    for split, examples in (("train", train), ("validation", val)):
        report[split]["desirable"] = sum(ex["label"] for ex in examples)
        report[split]["undesirable"] = len(examples) - report[split]["desirable"]
    return train, val, report
