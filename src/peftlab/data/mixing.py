"""Data mixing for SFT: replay of general data, and weighted multi-task mixtures.

Fine-tuning on one narrow task can make a model worse at everything else. Two remedies
live here; both are seeded by ``train.seed`` and counted in the data report.

Replay (``data.replay``, ``data.replay_ratio``): rows of a general file are mixed in so that
they make up ``replay_ratio`` of the final training set: ``round(r * n / (1 - r))`` replay
examples for ``n`` task examples. A replay row with an instruction (``instruction_field``) or
a conversation (``messages_field``) is an ordinary SFT example (same template, loss on the
answer). A row with only a ``text_field`` (e.g. a WikiText paragraph) is plain language
modelling: the loss covers the whole text, there is no chat template and no eos (it is a
continuation, not an answer), and text longer than ``train.max_length`` is cut (not dropped:
there is no answer end to lose). Plain ``.txt``/``.raw`` files are read one row per non-empty
line, as ``{text_field: line}``.

Mixtures (``data.mixture``): each source is read, cleaned and split on its own (with its own
format/fields/template overrides). Weights are *exact shares* of the training set, not
per-draw probabilities: source i gets ``mixture_size * w_i / sum(w)`` examples (largest
remainder rounding, so the counts add up), where ``mixture_size`` defaults to the sum of the
sources' training rows. A source below its quota is repeated (whole copies plus a seeded
sample of the rest); a source above it is subsampled without replacement. Every example keeps
its source in ``example["source"]``, which gives per-source validation metrics
(``val_loss/<name>``, see :meth:`peftlab.tasks.sft.SFTTask.metrics`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.config import DataConfig
from peftlab.data.readers import MAX_REPORTED_ERRORS, TEXT_SUFFIXES, DataError, read_records
from peftlab.data.sft import SFTStats

# Keys of a mixture entry that override the same-named data.* option for that source.
OVERRIDES = ("format", "template", "system_prompt", "messages_field", "instruction_field",
             "input_field", "output_field", "max_rows")

Rows = list[tuple[int, dict[str, Any]]]  # (1-based file row, record)
Build = Callable[[Rows], tuple[list[dict[str, Any]], SFTStats]]


def source_data_config(data: DataConfig, entry: dict[str, Any]) -> DataConfig:
    """The ``data`` options of one mixture source: the run's, with the entry's overrides."""
    overrides = {k: entry[k] for k in OVERRIDES if k in entry}
    validation = entry.get("validation")
    return dataclasses.replace(
        data, train=entry["train"], validation=validation,
        validation_split=0.0 if validation else data.validation_split,
        mixture=None, mixture_size=None, replay=None, replay_ratio=0.0, **overrides)


def mixture_quotas(weights: list[float], total: int) -> list[int]:
    """Examples per source: ``total * w_i / sum(w)`` rounded by largest remainder."""
    wsum = sum(weights)
    if wsum <= 0:
        raise ValueError("mixture weights must have a positive sum")
    exact = [total * w / wsum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def replay_count(task_examples: int, ratio: float) -> int:
    """Replay examples so that they are ``ratio`` of ``task_examples + replay``."""
    return round(ratio * task_examples / (1.0 - ratio)) if ratio > 0 else 0


def sample_examples(rows: Rows, build: Build, n: int,
                    seed: str) -> tuple[list[dict[str, Any]], list[SFTStats], dict[str, int]]:
    """``n`` examples built from ``rows`` in a seeded order.

    Rows are built only as far as needed (a large source sampled down is not tokenized in
    full); rows dropped while building (too long, invalid) are replaced by the next ones.
    If all usable rows give fewer than ``n`` examples they are repeated: whole copies, then
    a seeded sample of the remainder. Returns (examples, build statistics, counts).
    """
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    kept: list[dict[str, Any]] = []
    stats: list[SFTStats] = []
    pos = 0
    while len(kept) < n and pos < len(order):
        chunk = order[pos:pos + n - len(kept)]
        pos += len(chunk)
        examples, st = build([rows[i] for i in chunk])
        kept += examples
        stats.append(st)
    unique = len(kept)
    if 0 < unique < n:
        kept = kept * (n // unique) + rng.sample(kept, n % unique)
    return kept, stats, {"unique": unique, "sampled": len(kept), "repeated": len(kept) - unique}


def merge_stats(stats: list[SFTStats], source: str, max_length: int | None) -> SFTStats:
    """Sum the statistics of several builds (of one source, or of several)."""
    out = SFTStats(source=source, max_length=max_length)
    for st in stats:
        for key in ("rows", "kept", "dropped_invalid", "dropped_too_long", "dropped_no_target",
                    "tokens", "target_tokens"):
            setattr(out, key, getattr(out, key) + getattr(st, key))
        out.max_len = max(out.max_len, st.max_len)
        out.errors += st.errors[:MAX_REPORTED_ERRORS - len(out.errors)]
    out.mean_len = out.tokens / out.kept if out.kept else 0.0
    return out


def example_stats(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Token statistics of a final list of examples (after sampling, repeats and replay)."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    targets = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
    return {"kept": len(examples), "tokens": sum(lengths), "target_tokens": targets,
            "max_len": max(lengths, default=0),
            "mean_len": sum(lengths) / len(lengths) if lengths else 0.0}


# ---------------------------------------------------------------------------- replay


def read_replay_rows(path: str, data: DataConfig) -> Rows:
    """Rows of the replay file: any reader format, or a text file (one row per line)."""
    p = Path(path)
    if p.suffix.lower() in TEXT_SUFFIXES:
        if not p.is_file():
            raise DataError(f"data.replay: file not found: {path}")
        lines = p.read_text(encoding="utf-8").splitlines()
        rows = [(n, {data.text_field: line.strip()}) for n, line in enumerate(lines, start=1)
                if line.strip()]
        if not rows:
            raise DataError(f"{path}: file is empty (no non-blank lines)")
        return rows
    records, report = read_records(path, on_error=data.on_error)
    return list(zip(report.row_numbers, records, strict=True))


def is_plain_text(record: dict[str, Any], data: DataConfig) -> bool:
    """A replay row without an instruction or a conversation, but with a text field."""
    return (data.messages_field not in record and data.instruction_field not in record
            and data.text_field in record)


def build_text_examples(rows: Rows, tokenizer: Any, data: DataConfig, max_length: int,
                        source: str) -> tuple[list[dict[str, Any]], SFTStats, int]:
    """Plain-text rows -> LM examples (labels = every token), cut to ``max_length``.

    Returns (examples, stats, number of texts cut).
    """
    stats = SFTStats(source=source, max_length=max_length, rows=len(rows))
    examples, cut = [], 0
    for row, record in rows:
        text = record.get(data.text_field)
        if not isinstance(text, str) or not text.strip():
            stats.invalid(DataError(f"{source}:{row}: field {data.text_field!r} must be a "
                                    f"non-empty string, got {text!r:.40}"), data.on_error)
            continue
        ids = list(tokenizer(text)["input_ids"])
        if len(ids) > max_length:
            ids, cut = ids[:max_length], cut + 1
        if len(ids) < 2:  # the first token is never predicted
            stats.dropped_no_target += 1
            continue
        examples.append({"input_ids": ids, "labels": list(ids)})
        stats.tokens += len(ids)
        stats.target_tokens += len(ids) - 1
        stats.max_len = max(stats.max_len, len(ids))
    stats.kept = len(examples)
    stats.mean_len = stats.tokens / stats.kept if stats.kept else 0.0
    return examples, stats, cut
