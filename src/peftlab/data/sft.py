"""Turn rows into chat messages, and messages into tokens with completion-only labels.

Instruction tuning should only teach the model to *answer*: the loss is computed on
the assistant turns (including their end-of-turn marker, so the model learns to stop)
and never on the system prompt, the user's words or the role headers. We render the
conversation with the tokenizer's own chat template, find each assistant answer as a
character span by rendering prefixes, tokenize the whole text once and label the
tokens that fall inside those spans. This works for any prefix-stable template
without template-specific token surgery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from peftlab.config import DataConfig
from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.readers import DataError, RowStats

ROLES = ("system", "user", "assistant")

# ChatML, used when a tokenizer ships without a template (base models). The eos token
# is appended to assistant turns so generation stops at the end of an answer.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' and eos_token is defined and eos_token"
    " and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The tokenizer's chat template can't be used for completion-only labels."""


# ---------------------------------------------------------------- rows -> messages


def record_to_messages(record: dict[str, Any], cfg: DataConfig, where: str) -> list[dict[str, str]]:
    """Map one row to ``[{"role", "content"}, ...]``; ``where`` ("file:row") prefixes errors."""
    fmt = cfg.format
    if fmt == "auto":
        if cfg.messages_field in record:
            fmt = "chat"
        elif cfg.instruction_field in record:
            fmt = "alpaca"
        else:
            raise DataError(
                f"{where}: can't tell the format: no {cfg.messages_field!r} field (chat) and no "
                f"{cfg.instruction_field!r} field (alpaca); the row has: {_field_list(record)}"
            )
    messages = (
        _chat_messages(record, cfg, where)
        if fmt == "chat"
        else _alpaca_messages(record, cfg, where)
    )
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def _alpaca_messages(record: dict[str, Any], cfg: DataConfig, where: str) -> list[dict[str, str]]:
    instruction = _text_field(record, cfg.instruction_field, where)
    extra = _text_field(record, cfg.input_field, where, required=False)
    output = _text_field(record, cfg.output_field, where)
    if not instruction.strip() and not extra.strip():
        raise DataError(f"{where}: field {cfg.instruction_field!r} is empty")
    if not output.strip():
        raise DataError(f"{where}: field {cfg.output_field!r} is empty")
    user = "\n\n".join(part for part in (instruction, extra) if part.strip())
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _chat_messages(record: dict[str, Any], cfg: DataConfig, where: str) -> list[dict[str, str]]:
    name = cfg.messages_field
    if name not in record:
        raise DataError(f"{where}: field {name!r} is missing (available: {_field_list(record)})")
    raw = record[name]
    if isinstance(raw, str):  # CSV cells can only hold the conversation as a JSON string
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: field {name!r} is a string but not valid JSON ({exc.msg})"
            ) from None
    if not isinstance(raw, list):
        raise DataError(f"{where}: field {name!r} must be a list of messages, got {_type(raw)}")
    if not raw:
        raise DataError(f"{where}: field {name!r} is empty")
    messages = []
    for i, msg in enumerate(raw):
        key = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(
                f"{where}: field {key!r} must be an object with 'role' and 'content', "
                f"got {_type(msg)}"
            )
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(
                f"{where}: field '{key}.role' must be one of {', '.join(ROLES)}, got {role!r}"
            )
        if role == "system" and i != 0:
            raise DataError(f"{where}: field '{key}.role': a system message must come first")
        content = _content(msg.get("content"), f"{key}.content", where)
        messages.append({"role": role, "content": content})
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is None or first["role"] != "user":
        raise DataError(
            f"{where}: field {name!r}: the first non-system message must be from the user"
        )
    last = max(
        (i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"].strip()),
        default=None,
    )
    if last is None:
        raise DataError(f"{where}: field {name!r} has no assistant message with non-empty content")
    return messages[: last + 1]  # trailing turns after the last answer carry no loss


def _content(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)  # OpenAI-style [{"type": "text", "text": ...}]
    raise DataError(f"{where}: field {key!r} must be a string, got {_type(value)}")


def _text_field(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if not required:
            return ""
        what = "is missing" if key not in record else "is null"
        raise DataError(f"{where}: field {key!r} {what} (available: {_field_list(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_type(value)}")
    return value


def _field_list(record: dict[str, Any]) -> str:
    return ", ".join(str(k) for k in record) or "no fields"


def _type(value: Any) -> str:
    return (
        f"{type(value).__name__} {value!r}"
        if isinstance(value, (int, float))
        else type(value).__name__
    )


# ---------------------------------------------------------------- messages -> tokens


def ensure_chat_template(tokenizer: Any) -> bool:
    """Install :data:`DEFAULT_CHAT_TEMPLATE` if the tokenizer has none; True if it did.

    No tokens are added: on a base model the ChatML markers are tokenized as plain
    text, so the (frozen) embedding matrix never needs resizing.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def render_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The text a model should continue to answer ``messages`` (generation prompt added)."""
    ensure_chat_template(tokenizer)
    return _render(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
    """Token ids of :func:`render_prompt`, with BOS handled exactly as in training."""
    text = render_prompt(messages, tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = _bos_to_prepend(tokenizer, text)
    return ([bos] if bos is not None else []) + ids


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: Any, max_length: int | None = None
) -> dict[str, Any]:
    """Tokenize a conversation; labels are -100 except on assistant answers.

    Never truncates: with ``max_length`` the result also has ``too_long`` and the
    caller decides (cutting an answer would teach the model to stop mid-sentence).
    """
    ensure_chat_template(tokenizer)
    text, spans = _render_with_spans(messages, tokenizer)
    if getattr(tokenizer, "is_fast", False):
        ids, labels = _encode_with_offsets(tokenizer, text, spans)
    else:
        ids, labels = _encode_pieces(tokenizer, text, spans)
    bos = _bos_to_prepend(tokenizer, text)
    if bos is not None:
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    out: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if max_length is not None:
        out["too_long"] = len(ids) > max_length
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _render_with_spans(
    messages: list[dict[str, str]], tokenizer: Any
) -> tuple[str, list[tuple[int, int]]]:
    """Full text plus the [start, end) character span of every assistant answer."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        if i == 0:
            raise ChatTemplateError("a conversation can't start with an assistant message")
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        for part, whole in ((prompt, upto), (upto, full)):
            if not whole.startswith(part):
                raise _not_prefix_stable(i, part, whole)
        if len(upto) > len(prompt):
            spans.append((len(prompt), len(upto)))
    return full, spans


def _not_prefix_stable(index: int, part: str, whole: str) -> ChatTemplateError:
    pos = next((k for k, (a, b) in enumerate(zip(part, whole, strict=False)) if a != b), len(part))
    return ChatTemplateError(
        f"the chat template is not prefix-stable at message {index} (assistant): a shorter "
        f"conversation does not render as a prefix of the longer one (first difference: "
        f"{part[pos : pos + 30]!r} vs {whole[pos : pos + 30]!r}). Templates that rewrite earlier "
        f"turns (e.g. strip reasoning) can't give completion-only labels; set a prefix-stable "
        f"tokenizer.chat_template instead."
    )


def _encode_with_offsets(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    span_of = [0] * (len(text) + 1)  # 1-based span number of every character, 0 = prompt
    for n, (start, end) in enumerate(spans, start=1):
        span_of[start:end] = [n] * (end - start)
    labels = []
    for token, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = span_of[start] != 0 and span_of[start] == span_of[max(start, end - 1)]
        labels.append(token if inside else IGNORE_INDEX)
    return ids, labels


def _encode_pieces(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Fallback without offset mappings: tokenize prompt and answer pieces separately."""
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, target in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
                ids += piece_ids
                labels += piece_ids if target else [IGNORE_INDEX] * len(piece_ids)
        cursor = end
    return ids, labels


def _bos_to_prepend(tokenizer: Any, text: str) -> int | None:
    """BOS id if the tokenizer normally adds one and the template didn't write it."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None or text.startswith(bos):
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id if probe and probe[0] == bos_id else None


# ---------------------------------------------------------------- dataset building


@dataclass
class SFTStats(RowStats):
    """RowStats plus the tokens that carry the loss."""

    target_tokens: int = 0

    def summary(self) -> str:
        drops = [
            f"{n} {why}"
            for n, why in (
                (self.dropped_too_long, f"longer than {self.max_length} tokens"),
                (self.dropped_no_target, "without target tokens"),
                (self.dropped_invalid, "invalid"),
            )
            if n
        ]
        share = self.target_tokens / self.tokens if self.tokens else 0.0
        return (
            f"{self.source or 'data'}: {self.rows} rows -> {self.kept} examples"
            f"{' (dropped ' + ', '.join(drops) + ')' if drops else ''}; "
            f"{self.tokens} tokens, {self.target_tokens} targets ({share:.0%}); "
            f"length mean {self.mean_len:.1f}, max {self.max_len}"
        )


def build_sft_examples(
    records: list[dict[str, Any]],
    tokenizer: Any,
    cfg: DataConfig,
    max_length: int,
    source: str,
    row_numbers: list[int] | None = None,
) -> tuple[list[dict[str, list[int]]], SFTStats]:
    """Rows -> ``{"input_ids", "labels"}`` examples, dropping (and counting) unusable ones.

    Rows longer than ``max_length`` are dropped, not truncated. Invalid rows raise
    unless ``cfg.on_error == "skip"``. ``row_numbers`` (from ReadReport) keeps error
    locations right when the reader skipped rows.
    """
    ensure_chat_template(tokenizer)
    stats = SFTStats(source=source, max_length=max_length, rows=len(records))
    examples = []
    for i, record in enumerate(records):
        where = f"{source}:{row_numbers[i] if row_numbers else i + 1}"
        try:
            messages = record_to_messages(record, cfg, where)
        except DataError as exc:
            stats.invalid(exc, cfg.on_error)
            continue
        ex = tokenize_conversation(messages, tokenizer)
        n = len(ex["input_ids"])
        targets = sum(
            1 for t in ex["labels"][1:] if t != IGNORE_INDEX
        )  # the first is never predicted
        if n > max_length:
            stats.dropped_too_long += 1
        elif targets == 0:
            stats.dropped_no_target += 1
        else:
            examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
            stats.tokens += n
            stats.target_tokens += targets
            stats.max_len = max(stats.max_len, n)
    stats.kept = len(examples)
    stats.mean_len = stats.tokens / stats.kept if stats.kept else 0.0
    return examples, stats
