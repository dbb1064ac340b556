"""Classification data: labelled rows, the label map, stratified splits, tokenization.

Labels are compared as strings, so ``1`` in a JSONL file and ``"1"`` in a TSV file are the
same class. The label order (class ids) is fixed by ``data.labels`` or is the sorted set of
training labels (numerically when every label is an integer, so "10" sorts after "9").
Texts longer than ``max_length`` are truncated, and every truncation is counted: cutting a
review loses evidence, and the data report has to say how often it happened.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from peftlab.data.readers import DataError, read_records, skip_or_raise

T = TypeVar("T")


@dataclass
class LabelledRow:
    """One input row: its 1-based row number in ``source``, text(s), label (or None) and the
    group it belongs to (``data.group_field``, e.g. its document; None without one)."""

    source: str
    row: int
    text: str
    text_pair: str | None
    label: str | None
    group: str | None = None

    @property
    def joined(self) -> str:
        """The row as one string (a text pair on two lines): what word-level models read."""
        return self.text if self.text_pair is None else f"{self.text}\n{self.text_pair}"


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool
    tokens_before: int  # length before truncation


# ----------------------------------------------------------------------------- labels


def normalize_label(value: Any) -> str | None:
    """A label as a string (``1``, ``1.0`` and ``"1"`` are one class); None if absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def sort_labels(labels: list[str]) -> list[str]:
    """Sorted numerically if every label is an integer, else alphabetically."""
    unique = set(labels)
    if unique and all(re.fullmatch(r"-?\d+", label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def label_list(train_labels: list[str], fixed: list[Any] | None) -> list[str]:
    """The class order: ``data.labels`` if given (checked against train), else sorted train labels."""
    if fixed is None:
        return sort_labels(train_labels)
    labels = [normalize_label(v) for v in fixed]
    if any(label is None for label in labels) or len(set(labels)) != len(labels):
        raise DataError(f"data.labels must be unique, non-empty labels, got {fixed}")
    return labels  # type: ignore[return-value]


def class_counts(labels: list[str], order: list[str]) -> dict[str, int]:
    counts = Counter(labels)
    return {label: counts.get(label, 0) for label in order}


def balanced_class_weights(counts: list[int]) -> list[float]:
    """``n_samples / (n_classes * count_c)`` (scikit-learn's "balanced").

    Summed over the training set these weights add up to ``n_samples``, so a weighted
    loss sum divided by the number of examples stays on the scale of the unweighted mean.
    A class without training examples gets the weight it would have with one.
    """
    n, k = sum(counts), len(counts)
    return [n / (k * max(c, 1)) for c in counts]


# ----------------------------------------------------------------------------- splits


def stratified_split(rows: list[T], labels: list[str], fraction: float,
                     seed: int) -> tuple[list[T], list[T]]:
    """Split ``rows`` into (train, validation) holding out ``fraction`` of every class.

    Per-class quotas are ``fraction * count_c`` rounded by largest remainder, so the total is
    ``round(fraction * n)`` (at least 1) and class proportions are kept as closely as
    integers allow. Every class keeps at least one training row. Deterministic in ``seed``;
    both outputs keep the input order.
    """
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    if fraction <= 0:
        return list(rows), []
    if not 0 < fraction < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {fraction}")
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    capacity = {c: len(by_class[c]) - 1 for c in classes}  # one row of each class stays in train
    target = min(max(1, round(fraction * len(rows))), sum(capacity.values()))
    if target < 1:
        raise ValueError(f"validation_split={fraction} leaves no training rows ({len(rows)} rows)")
    exact = {c: fraction * len(by_class[c]) for c in classes}
    quota = {c: min(int(exact[c]), capacity[c]) for c in classes}
    # Largest remainders first; ties broken by class name so the result is reproducible.
    order = sorted(classes, key=lambda c: (-(exact[c] - int(exact[c])), c))
    while sum(quota.values()) < target:
        grew = False
        for c in order:
            if sum(quota.values()) >= target:
                break
            if quota[c] < capacity[c]:
                quota[c] += 1
                grew = True
        if not grew:
            break
    held: set[int] = set()
    for c in classes:
        members = list(by_class[c])
        random.Random(f"peftlab-stratified:{seed}:{c}").shuffle(members)
        held.update(members[:quota[c]])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def grouped_split(rows: list[T], groups: list[str], fraction: float,
                  seed: int) -> tuple[list[T], list[T]]:
    """Split ``rows`` into (train, validation) so that no group is on both sides.

    Rows of one document are near-duplicates of each other in style and content; splitting
    them across train and validation overstates how well the model generalises. Groups are
    visited in a seeded order and held out while that brings the held-out row count closer
    to ``fraction * len(rows)`` (or, if none does, the smallest group); at least one group
    lands on each side. Both outputs keep the input order.
    """
    if len(rows) != len(groups):
        raise ValueError(f"{len(rows)} rows but {len(groups)} groups")
    if fraction <= 0:
        return list(rows), []
    if not 0 < fraction < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {fraction}")
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    if len(members) < 2:
        raise ValueError(f"a grouped split needs at least 2 groups, found {len(members)}")
    order = sorted(members)
    random.Random(f"peftlab-grouped:{seed}").shuffle(order)
    target = fraction * len(rows)
    held: list[str] = []
    count = 0
    for g in order:
        size = len(members[g])
        if len(held) < len(members) - 1 and abs(count + size - target) < abs(count - target):
            held.append(g)
            count += size
    if not held:  # every group is more than twice the target: hold out the smallest
        held.append(min(order, key=lambda g: len(members[g])))
    held_rows = {i for g in held for i in members[g]}
    return ([r for i, r in enumerate(rows) if i not in held_rows],
            [r for i, r in enumerate(rows) if i in held_rows])


# ----------------------------------------------------------------------------- reading


def read_labelled(path: str, text_field: str, text_pair_field: str | None, label_field: str,
                  on_error: str = "raise", max_rows: int | None = None,
                  require_label: bool = True,
                  group_field: str | None = None) -> tuple[list[LabelledRow], dict[str, Any]]:
    """Rows with their texts and labels; malformed rows raise or (``on_error="skip"``) are counted."""
    records, read_report = read_records(path, on_error=on_error, max_rows=max_rows)
    report: dict[str, Any] = {"path": str(path), "rows_read": read_report.rows_read,
                              "rows_skipped": read_report.rows_skipped,
                              "skipped": list(read_report.skipped)}
    rows: list[LabelledRow] = []
    for rec, row in zip(records, read_report.row_numbers, strict=True):
        try:
            rows.append(labelled_row(rec, str(path), row, text_field, text_pair_field,
                                      label_field, require_label, group_field))
        except DataError as err:
            skip_or_raise(err, on_error, report["skipped"])
            report["rows_skipped"] += 1
    if not rows:
        raise DataError(f"{path}: no usable rows; first problem: "
                        f"{report['skipped'][0] if report['skipped'] else 'none'}")
    return rows, report


def labelled_row(rec: dict[str, Any], source: str, row: int, text_field: str,
                  text_pair_field: str | None, label_field: str,
                  require_label: bool, group_field: str | None = None) -> LabelledRow:
    def text_of(field: str) -> str:
        if field not in rec:
            raise DataError(f"{source}:{row}: field {field!r} is missing "
                            f"(available: {', '.join(map(str, rec))})")
        value = rec[field]
        if not isinstance(value, str):
            raise DataError(f"{source}:{row}: field {field!r} must be a string, "
                            f"got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{source}:{row}: field {field!r} is empty")
        return value

    text = text_of(text_field)
    pair = text_of(text_pair_field) if text_pair_field else None
    label = normalize_label(rec.get(label_field))
    if label is None and require_label:
        what = "missing" if label_field not in rec else "empty"
        raise DataError(f"{source}:{row}: label field {label_field!r} is {what}")
    group = None
    if group_field is not None:
        group = normalize_label(rec.get(group_field))  # 7 and "7" are one group
        if group is None:
            what = "missing" if group_field not in rec else "empty"
            raise DataError(f"{source}:{row}: group field {group_field!r} (data.group_field) "
                            f"is {what}")
    return LabelledRow(source, row, text, pair, label, group)


def check_known_labels(rows: list[LabelledRow], labels: list[str], field: str,
                       what: str = "the training labels") -> None:
    """Every row's label must be a known class; the error names file, row and label."""
    known = set(labels)
    for r in rows:
        if r.label is not None and r.label not in known:
            raise DataError(f"{r.source}:{r.row}: label {r.label!r} (field {field!r}) is not "
                            f"one of {what} {labels}")


# ----------------------------------------------------------------------------- tokenization


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None,
                 max_length: int) -> list[Encoded]:
    """Tokenize for a classification head (with the model's special tokens). A pair over
    ``max_length`` loses tokens from the longer of its two texts first."""
    full = tokenizer(texts, pairs, truncation=False, verbose=False)
    out = []
    for i, ids in enumerate(full["input_ids"]):
        types = full["token_type_ids"][i] if "token_type_ids" in full else None
        n = len(ids)
        if n > max_length:
            enc = tokenizer(texts[i], pairs[i] if pairs else None, truncation="longest_first",
                            max_length=max_length)
            ids, types = enc["input_ids"], enc.get("token_type_ids")
        out.append(Encoded(list(ids), list(types) if types is not None else None,
                           n > max_length, n))
    return out


_PLACEHOLDER = re.compile(r"\{(text|text_pair)\}")


def render_template(template: str, text: str, text_pair: str | None) -> str:
    """Fill ``{text}``/``{text_pair}`` in one pass (braces inside the texts stay literal)."""
    values = {"text": text, "text_pair": text_pair or ""}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def encode_prompt(tokenizer, template: str, text: str, text_pair: str | None,
                  max_length: int, add_special_tokens: bool = True) -> Encoded:
    """Tokenize a verbaliser prompt. Over-long inputs lose tokens from the end of the longest
    text field, never from the template, so the prompt still ends with its cue ("Sentiment:").
    ``add_special_tokens=False`` for a prompt that continues a longer one (in-context demos)."""
    fields = {"text": text, "text_pair": text_pair}

    def ids() -> list[int]:
        return tokenizer(render_template(template, fields["text"], fields["text_pair"]),
                         add_special_tokens=add_special_tokens)["input_ids"]

    current = ids()
    before = len(current)
    for _ in range(16):
        excess = len(current) - max_length
        if excess <= 0:
            return Encoded(current, None, before > max_length, before)
        name = max((k for k in fields if fields[k]),
                   key=lambda k: len(tokenizer(fields[k], add_special_tokens=False)["input_ids"]))
        toks = tokenizer(fields[name], add_special_tokens=False)["input_ids"]
        if len(toks) <= 1:
            break
        fields[name] = tokenizer.decode(toks[:max(1, len(toks) - excess)])
        current = ids()
    raise DataError(f"the prompt template alone does not fit in max_length={max_length} tokens "
                    f"({len(current)} tokens after truncating the text)")


Encoder = Callable[[list[str], "list[str] | None"], "list[Encoded]"]


def build_examples(rows: list[LabelledRow], labels: list[str], encode: Encoder,
                   chunk: int = 1024) -> tuple[list[dict], dict[str, Any]]:
    """Tokenized examples ``{input_ids, [token_type_ids], label, row, text}`` and their
    statistics (``text``: the raw row, for a word-level ensemble member).

    ``encode(texts, pairs)`` tokenizes a list of rows (pairs is None without text pairs).
    ``label`` is the class id, or -1 for a row without a label (prediction inputs).
    """
    index = {label: i for i, label in enumerate(labels)}
    encoded: list[Encoded] = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        has_pairs = any(r.text_pair is not None for r in part)
        encoded += encode([r.text for r in part],
                          [r.text_pair or "" for r in part] if has_pairs else None)
    examples, truncated, longest = [], 0, 0
    for r, enc in zip(rows, encoded, strict=True):
        example: dict[str, Any] = {"input_ids": enc.input_ids,
                                   "label": index[r.label] if r.label is not None else -1,
                                   "row": r.row, "text": r.joined}
        if enc.token_type_ids is not None:
            example["token_type_ids"] = enc.token_type_ids
        examples.append(example)
        truncated += enc.truncated
        longest = max(longest, enc.tokens_before)
    stats = {"rows": len(rows), "kept": len(examples), "truncated": truncated,
             "longest_tokens": longest,
             "class_counts": class_counts([r.label for r in rows if r.label is not None], labels)}
    return examples, stats
