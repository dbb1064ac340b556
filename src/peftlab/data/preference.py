"""Preference data: (prompt, chosen, rejected) rows -> chat messages -> token pairs.

Accepted row shapes (field names from ``data.prompt_field/chosen_field/rejected_field``):

* ``prompt`` (a string or a list of chat messages) with ``chosen``/``rejected`` answers
  (strings, or one-message lists ``[{"role": "assistant", ...}]`` as in TRL's format);
* ``chosen``/``rejected`` as whole conversations (lists of messages, e.g. UltraFeedback
  binarized): the shared prefix is the prompt, the final assistant turn the response;
* Anthropic HH-RLHF: ``chosen``/``rejected`` are full transcripts with ``\\n\\nHuman:`` and
  ``\\n\\nAssistant:`` turns; they must agree up to the final Assistant turn.

A pair is scored on its final response only: earlier assistant turns belong to the
prompt, so DPO labels and reward-model inputs both come from the same parsed messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.config import DataConfig
from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.readers import DataError, RowStats, read_records
from peftlab.data.sft import ROLES, ensure_chat_template, tokenize_conversation
from peftlab.data.splits import split_off

Messages = list[dict[str, str]]

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    prompt: Messages  # ends with a user turn
    chosen: str
    rejected: str
    margin: float = 0.0


# ---------------------------------------------------------------- rows -> messages


def is_hh_transcript(text: str) -> bool:
    return text.lstrip("\n").startswith("Human:")


def parse_hh_transcript(text: str, where: str) -> Messages:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> user/assistant messages (text stripped).

    A trailing empty ``Assistant:`` (an HH-style prompt waiting for its answer) is dropped.
    Consecutive turns of one speaker (about 0.4% of HH-RLHF rows) are joined into one turn.
    """
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise DataError(f"{where}: text before the first 'Human:' turn: {parts[0][:40]!r}")
    messages: Messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _HH_ROLES[role], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(c for c in (messages[-1]["content"], content) if c)
        else:
            messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _messages(raw: Any, key: str, where: str) -> Messages:
    """A list of ``{"role", "content"}`` (or its JSON string), checked."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {key!r} is neither text nor a JSON list of "
                            "messages") from None
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise DataError(f"{where}: field '{key}[{i}]' must be an object with a role in "
                            f"{', '.join(ROLES)} and a content")
        content = msg.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{key}[{i}].content' must be a string")
        out.append({"role": msg["role"], "content": content})
    return out


def _prompt_messages(raw: Any, key: str, where: str) -> Messages:
    if isinstance(raw, str) and is_hh_transcript(raw):
        messages = parse_hh_transcript(raw, where)
    elif isinstance(raw, str) and not _json_list(raw):
        messages = [{"role": "user", "content": raw}]
    else:
        messages = _messages(raw, key, where)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: field {key!r}: the prompt must end with a user turn")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise DataError(f"{where}: field {key!r} is empty")
    return messages


def _json_list(text: str) -> bool:
    """Whether a string cell holds a JSON list (a conversation stored as text, e.g. in CSV)."""
    if not text.lstrip().startswith("["):
        return False
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


def _split_conversation(raw: Any, key: str, where: str) -> tuple[Messages, str]:
    """A whole conversation -> (prompt messages, final assistant answer)."""
    if isinstance(raw, str):
        if not is_hh_transcript(raw):
            raise DataError(f"{where}: field {key!r} is plain text, but the row has no prompt "
                            "field and it is not an HH-RLHF transcript ('\\n\\nHuman: ...')")
        messages = parse_hh_transcript(raw, where)
        if messages and messages[-1]["role"] == "user" and raw.rstrip().endswith("Assistant:"):
            raise DataError(f"{where}: field {key!r}: the final Assistant turn is empty")
    else:
        messages = _messages(raw, key, where)
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise DataError(f"{where}: field {key!r} must end with a user turn followed by an "
                        "assistant answer")
    return messages[:-1], messages[-1]["content"]


def _answer(raw: Any, key: str, where: str) -> str:
    """A response given on its own: a string or ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(raw, str):
        return raw
    messages = _messages(raw, key, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r} must be the answer alone (a string or one "
                        "assistant message) when the row has a prompt")
    return messages[0]["content"]


def _required(record: dict[str, Any], key: str, where: str) -> Any:
    if record.get(key) is None:
        what = "is missing" if key not in record else "is null"
        fields = ", ".join(str(k) for k in record) or "no fields"
        raise DataError(f"{where}: field {key!r} {what} (available: {fields})")
    return record[key]


def record_to_pair(record: dict[str, Any], cfg: DataConfig, where: str,
                   margin_field: str | None = None) -> PreferencePair:
    """One preference row -> :class:`PreferencePair`; ``where`` ("file:row") prefixes errors."""
    ck, rk, pk = cfg.chosen_field, cfg.rejected_field, cfg.prompt_field
    chosen_raw, rejected_raw = _required(record, ck, where), _required(record, rk, where)
    if isinstance(chosen_raw, str) and _json_list(chosen_raw):  # a conversation in a CSV cell
        chosen_raw = json.loads(chosen_raw)
    if isinstance(rejected_raw, str) and _json_list(rejected_raw):
        rejected_raw = json.loads(rejected_raw)
    whole = isinstance(chosen_raw, list) and len(chosen_raw) > 1
    if record.get(pk) is not None and not whole:
        prompt = _prompt_messages(record[pk], pk, where)
        chosen, rejected = _answer(chosen_raw, ck, where), _answer(rejected_raw, rk, where)
    else:
        prompt, chosen = _split_conversation(chosen_raw, ck, where)
        prompt_r, rejected = _split_conversation(rejected_raw, rk, where)
        if prompt != prompt_r:
            turn = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r, strict=False))
                         if a != b), min(len(prompt), len(prompt_r)))
            raise DataError(f"{where}: fields {ck!r} and {rk!r} differ before the final "
                            f"assistant turn (first at turn {turn + 1}); a pair must share "
                            "its prompt")
    for key, text in ((ck, chosen), (rk, rejected)):
        if not text.strip():
            raise DataError(f"{where}: field {key!r} has an empty answer")
    if cfg.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    margin = 0.0
    if margin_field is not None:
        value = _required(record, margin_field, where)
        try:
            margin = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: field {margin_field!r} must be a number, "
                            f"got {value!r}") from None
    return PreferencePair(prompt, chosen, rejected, margin)


def record_to_prompt(record: dict[str, Any], cfg: DataConfig, where: str) -> Messages:
    """Prompt messages (ending with a user turn) for generation, e.g. PPO rollouts.

    From the prompt field, a preference row, a chat row (answers after the last user turn
    are dropped) or an alpaca row (its output is ignored).
    """
    if record.get(cfg.prompt_field) is not None:
        messages = _prompt_messages(record[cfg.prompt_field], cfg.prompt_field, where)
    elif record.get(cfg.chosen_field) is not None:
        return record_to_pair(record, cfg, where).prompt
    elif cfg.messages_field in record:
        messages = _messages(record[cfg.messages_field], cfg.messages_field, where)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: field {cfg.messages_field!r} has no user turn to answer")
    elif cfg.instruction_field in record:
        parts = [record.get(cfg.instruction_field), record.get(cfg.input_field) or ""]
        if not all(isinstance(p, str) for p in parts) or not parts[0].strip():
            raise DataError(f"{where}: field {cfg.instruction_field!r} must be non-empty text "
                            f"(and {cfg.input_field!r} text if given)")
        messages = [{"role": "user", "content": "\n\n".join(p for p in parts if p.strip())}]
    else:
        fields = ", ".join(str(k) for k in record) or "no fields"
        raise DataError(f"{where}: no prompt: expected a {cfg.prompt_field!r}, "
                        f"{cfg.chosen_field!r}, {cfg.messages_field!r} or "
                        f"{cfg.instruction_field!r} field (the row has: {fields})")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


# ---------------------------------------------------------------- messages -> tokens


def response_only_labels(labels: list[int]) -> list[int]:
    """Keep the last contiguous run of labels (the final answer); earlier answers -> -100."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end)


def encode_exchange(prompt: Messages, response: str, tokenizer: Any) -> dict[str, list[int]]:
    """Token ids of prompt + answer, with labels on the final answer only.

    Encoder tokenizers (with CLS/SEP, e.g. BERT) get their special tokens around the
    rendered text, so their pooled CLS position means what it was pre-trained to mean.
    """
    messages = [*prompt, {"role": "assistant", "content": response}]
    if tokenizer_is_encoder(tokenizer):
        ensure_chat_template(tokenizer)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}
    enc = tokenize_conversation(messages, tokenizer)
    return {"input_ids": enc["input_ids"], "labels": response_only_labels(enc["labels"])}


@dataclass
class PreferenceStats(RowStats):
    """RowStats plus pairs dropped because both answers are the same."""

    dropped_identical: int = 0


def build_preference_examples(records: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig,
                              max_length: int, source: str, row_numbers: list[int] | None = None,
                              margin_field: str | None = None, first_id: int = 0,
                              ) -> tuple[list[dict[str, Any]], PreferenceStats]:
    """Rows -> ``{"id", "chosen_input_ids", "chosen_labels", "rejected_*", "margin"}``.

    Pairs where either side is longer than ``max_length`` are dropped (truncation would
    cut the very tokens being compared); so are pairs whose answers are identical.
    ``id`` numbers the kept pairs from ``first_id`` (keys for cached reference log-probs).
    """
    ensure_chat_template(tokenizer)
    stats = PreferenceStats(source=source, max_length=max_length, rows=len(records))
    examples: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        where = f"{source}:{row_numbers[i] if row_numbers else i + 1}"
        try:
            pair = record_to_pair(record, cfg, where, margin_field)
        except DataError as exc:
            stats.invalid(exc, cfg.on_error)
            continue
        if pair.chosen.strip() == pair.rejected.strip():
            stats.dropped_identical += 1
            continue
        chosen = encode_exchange(pair.prompt, pair.chosen, tokenizer)
        rejected = encode_exchange(pair.prompt, pair.rejected, tokenizer)
        longest = max(len(chosen["input_ids"]), len(rejected["input_ids"]))
        no_target = not tokenizer_is_encoder(tokenizer) and any(
            all(t == IGNORE_INDEX for t in side["labels"][1:]) for side in (chosen, rejected))
        if longest > max_length:
            stats.dropped_too_long += 1
            continue
        if no_target:
            stats.dropped_no_target += 1
            continue
        examples.append({"id": first_id + len(examples),
                         "chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                         "rejected_input_ids": rejected["input_ids"],
                         "rejected_labels": rejected["labels"], "margin": pair.margin})
        stats.tokens += len(chosen["input_ids"]) + len(rejected["input_ids"])
        stats.max_len = max(stats.max_len, longest)
    stats.kept = len(examples)
    stats.mean_len = stats.tokens / (2 * stats.kept) if stats.kept else 0.0
    return examples, stats


def tokenizer_is_encoder(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "cls_token", None) and getattr(tokenizer, "sep_token", None))


def pad_pairs(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows, right-padded into one batch of ``2 * len(examples)``.

    One forward pass scores both sides; row ``i`` pairs with row ``i + len(examples)``.
    """
    if not examples:
        raise ValueError("pad_pairs needs at least one example")
    seqs = [ex["chosen_input_ids"] for ex in examples] + [ex["rejected_input_ids"] for ex in examples]
    labs = [ex["chosen_labels"] for ex in examples] + [ex["rejected_labels"] for ex in examples]
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(seqs, labs, strict=True)):
        input_ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        labels[row, :len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "ids": torch.tensor([ex["id"] for ex in examples], dtype=torch.long),
            "margin": torch.tensor([float(ex.get("margin", 0.0)) for ex in examples])}


def read_split_records(cfg) -> tuple[list[dict], list[dict], list[int] | None,
                                     list[int] | None, dict[str, Any]]:
    """The run's training and validation records (a validation file, or a seeded split of the
    training rows), their file row numbers for error messages (None after a split), and the
    read report. Splitting by record keeps both answers of a pair on one side."""
    data = cfg.data
    if not data.train:
        raise DataError("data.train: no training file given")
    records, read_report = read_records(data.train, on_error=data.on_error, max_rows=data.max_rows)
    report: dict[str, Any] = {"train_file": {"path": data.train, **_read_dict(read_report)}}
    if not data.validation:
        records, val_records = split_off(records, data.validation_split, cfg.train.seed)
        return records, val_records, None, None, report
    val_records, val_report = read_records(data.validation, on_error=data.on_error)
    report["validation_file"] = {"path": data.validation, **_read_dict(val_report)}
    return records, val_records, read_report.row_numbers, val_report.row_numbers, report


def prepare_preference_data(cfg, tokenizer, margin_field: str | None = None,
                            ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, split and tokenize the run's preference data; return examples and a report."""
    data = cfg.data
    records, val_records, train_rows, val_rows, report = read_split_records(cfg)
    train, train_stats = build_preference_examples(
        records, tokenizer, data, cfg.train.max_length, data.train, train_rows, margin_field)
    val, val_stats = build_preference_examples(
        val_records, tokenizer, data, cfg.train.max_length, data.validation or data.train,
        val_rows, margin_field, first_id=len(train))
    report["train"], report["validation"] = vars(train_stats), vars(val_stats)
    return train, val, report


def _read_dict(read_report) -> dict[str, Any]:
    return {"rows_read": read_report.rows_read, "rows_skipped": read_report.rows_skipped,
            "skipped": read_report.skipped}
