"""The SFT data pipeline: read, clean, split, augment, render, tokenize, mix and pack.

Order matters: duplicates are removed before splitting (so copies can't straddle the
split), leaking training rows after it, and augmentation sees only the remaining training
rows. ``data.mixture`` does all that per source, then samples the training set by weight;
``data.replay`` rows are added last (peftlab.data.mixing). Only training examples are packed.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any

from peftlab.data.augment import augment_rows
from peftlab.data.clean import clean_rows, remove_leakage, summary
from peftlab.data.mixing import (
    build_text_examples,
    example_stats,
    is_plain_text,
    merge_stats,
    mixture_quotas,
    read_replay_rows,
    replay_count,
    sample_examples,
    source_data_config,
)
from peftlab.data.packing import pack_examples
from peftlab.data.readers import DataError, read_records
from peftlab.data.sft import build_sft_examples, record_to_messages
from peftlab.data.splits import split_off
from peftlab.data.templates import build_template_examples, load_template
from peftlab.evaluation.generate import generate_replies
from peftlab.models import load_model


def prepare_sft_data(cfg, tokenizer, model=None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, clean, split, augment, render, tokenize, mix and pack the run's SFT data.

    Order matters: duplicates are removed before splitting (so copies can't straddle the
    split), leaking training rows after it, and augmentation sees only the remaining
    training rows. ``data.mixture`` does all that per source, then samples the training set
    by weight; ``data.replay`` rows are added last (peftlab.data.mixing). Only training
    examples are packed. ``model`` is needed only for ``data.augment`` with ``paraphrase`` or
    ``synonyms: embedding``; without it the model is loaded for that step. Returns (train
    examples, validation examples, data report).
    """
    data = cfg.data
    if data.mixture:
        train, val, report = _prepare_mixture(cfg, tokenizer, model)
    else:
        train_rows, val_rows, report, template = _source_rows(cfg, tokenizer, model)
        train, train_stats = _build_examples(train_rows, tokenizer, data, template,
                                             cfg.train.max_length, data.train)
        val, val_stats = _build_examples(val_rows, tokenizer, data, template,
                                         cfg.train.max_length, data.validation or data.train)
        report["train"] = vars(train_stats)
        report["validation"] = vars(val_stats)
    if data.replay and data.replay_ratio > 0:
        train = _add_replay(train, cfg, tokenizer, report)
    if data.packing and train:
        train, report["packing"] = pack_examples(train, cfg.train.max_length)
        p = report["packing"]
        print(f"packing: {p['examples']} training examples -> {p['packed_rows']} rows of <= "
              f"{p['max_length']} tokens ({p['fill']:.0%} full)")
    return train, val, report


def _source_rows(cfg, tokenizer, model):
    """(train rows, validation rows, report, template) of ``cfg.data``'s files, cleaned,
    split and augmented; rows are ``(file row, record)``."""
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
        _, keep, cleaning["leakage"] = remove_leakage(
            [r for _, r in train_rows], [r for _, r in val_rows], data.clean, text_of, seed,
            [n for n, _ in train_rows], [n for n, _ in val_rows])
        train_rows = [train_rows[i] for i in keep]
    if cleaning:
        report["cleaning"] = cleaning
        print(summary(cleaning))
    if data.augment.method != "none":
        train_rows, report["augmentation"] = _augment(train_rows, cfg, tokenizer, model)

    template = None
    if data.template is not None:
        template = load_template(data.template)
        report["template"] = template.name
    return train_rows, val_rows, report, template


def _prepare_mixture(cfg, tokenizer, model):
    """``data.mixture``: every source prepared on its own, the training set sampled by weight
    (exact shares, peftlab.data.mixing); every example keeps its source name."""
    max_length, seed = cfg.train.max_length, cfg.train.seed
    sources = []
    for entry in cfg.data.mixture:
        sdata = source_data_config(cfg.data, entry)
        rows = _source_rows(dataclasses.replace(cfg, data=sdata), tokenizer, model)
        sources.append((entry, sdata, *rows))
    total = cfg.data.mixture_size or sum(len(s[2]) for s in sources)
    quotas = mixture_quotas([entry["weight"] for entry in cfg.data.mixture], total)
    train: list[dict] = []
    val: list[dict] = []
    train_stats, val_stats = [], []
    per_source: dict[str, Any] = {}
    for i, ((entry, sdata, train_rows, val_rows, report, template), quota) in enumerate(
            zip(sources, quotas, strict=True)):
        name = entry["name"]

        def build(rows, sdata=sdata, template=template):
            return _build_examples(rows, tokenizer, sdata, template, max_length, sdata.train)

        examples, stats, counts = sample_examples(train_rows, build, quota,
                                                  f"peftlab-mixture:{seed}:{name}")
        built = merge_stats(stats, sdata.train, max_length)
        if quota and not examples:
            raise DataError(f"data.mixture[{i}] ({name}): no usable training examples in "
                            f"{sdata.train} (see the data report)")
        source_val, vstats = _build_examples(val_rows, tokenizer, sdata, template, max_length,
                                             sdata.validation or sdata.train)
        for ex in examples + source_val:
            ex["source"] = name
        train += examples
        val += source_val
        train_stats.append(built)
        val_stats.append(vstats)
        per_source[name] = {**report, "weight": entry["weight"], "rows": len(train_rows),
                            **counts, "train": vars(built), "validation": vars(vstats)}
        dropped = built.rows - built.kept
        print(f"mixture {name}: weight {entry['weight']:g} -> {counts['sampled']} training "
              f"examples ({counts['unique']} distinct, {counts['repeated']} repeats) of "
              f"{len(train_rows)} rows ({dropped} dropped of {built.rows} tokenized); "
              f"{len(source_val)} validation examples")
    random.Random(f"peftlab-mixture:{seed}").shuffle(train)
    merged = vars(merge_stats(train_stats, "mixture", max_length))
    merged["unique"] = merged["kept"]
    merged.update(example_stats(train))
    report = {"mixture": {"size": total, "sources": per_source}, "train": merged,
              "validation": vars(merge_stats(val_stats, "mixture", max_length))}
    return train, val, report


def _add_replay(train, cfg, tokenizer, report):
    """Add ``data.replay`` examples so they are ``data.replay_ratio`` of the training set."""
    data, max_length = cfg.data, cfg.train.max_length
    template = None
    if data.template is not None:
        template = load_template(data.template)
    rows = read_replay_rows(data.replay, data)
    kinds = {"plain_text": 0, "instruction": 0, "truncated": 0}

    def build(chunk):
        text = [r for r in chunk if is_plain_text(r[1], data)]
        chat = [r for r in chunk if not is_plain_text(r[1], data)]
        examples, stats, cut = build_text_examples(text, tokenizer, data, max_length, data.replay)
        more, chat_stats = _build_examples(chat, tokenizer, data, template, max_length,
                                           data.replay)
        kinds["plain_text"] += stats.kept
        kinds["instruction"] += chat_stats.kept
        kinds["truncated"] += cut
        return examples + more, merge_stats([stats, chat_stats], data.replay, max_length)

    need = replay_count(len(train), data.replay_ratio)
    replay, stats, counts = sample_examples(rows, build, need,
                                            f"peftlab-replay:{cfg.train.seed}")
    if need and not replay:
        raise DataError(f"data.replay: no usable rows in {data.replay} (see the data report)")
    for ex in replay:
        ex["source"] = "replay"
    report["replay"] = {"path": data.replay, "ratio": data.replay_ratio, "rows": len(rows),
                        "task_examples": len(train), **counts, **kinds,
                        "built": vars(merge_stats(stats, data.replay, max_length))}
    print(f"replay: {counts['sampled']} examples from {data.replay} ({kinds['plain_text']} "
          f"plain text, {kinds['instruction']} instruction; {counts['repeated']} repeats) = "
          f"{data.replay_ratio:.0%} of {len(train) + len(replay)} training examples")
    train = train + replay
    random.Random(f"peftlab-replay:{cfg.train.seed}").shuffle(train)
    report["train"] = {**report["train"], **example_stats(train), "replay_examples": len(replay)}
    return train


def _build_examples(rows, tokenizer, data, template, max_length, source):
    records, numbers = [r for _, r in rows], [n for n, _ in rows]
    if template is None:
        return build_sft_examples(records, tokenizer, data, max_length, source=source,
                                  row_numbers=numbers)

    return build_template_examples(records, tokenizer, data, template, max_length, source,
                                   row_numbers=numbers)


def _prompt_answer_text(data):
    """``record -> (prompt text, answer text)`` for cleaning; None for unreadable rows."""
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
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    kept, keep, report = clean_rows([r for _, r in rows], cfg.data.clean, text_of, count_tokens,
                                    cfg.train.seed, [n for n, _ in rows])
    return [(rows[i][0], r) for i, r in zip(keep, kept, strict=True)], report


def _augment(rows, cfg, tokenizer, model):
    """Append augmented copies of the training rows (they keep their source's row number)."""
    data, aug = cfg.data, cfg.data.augment
    fields = aug.fields or [data.instruction_field, data.input_field, data.messages_field]
    if model is None and (aug.method == "paraphrase" or aug.synonyms == "embedding"):
        model, _ = load_model(cfg.model)  # the base model, freed after this step
    reply = None
    if aug.method == "paraphrase":
        reply = functools.partial(generate_replies, model, tokenizer,
                                  max_new_tokens=aug.max_new_tokens, batch_size=8,
                                  do_sample=True, temperature=aug.temperature, top_p=aug.top_p)
    new, sources, report = augment_rows([r for _, r in rows], aug, cfg.train.seed, fields,
                                        model=model, tokenizer=tokenizer, reply=reply)
    print(f"augmentation ({aug.method}): {report['rows_added']} new training rows from "
          f"{report['rows_in']}")
    return rows + [(rows[i][0], r) for i, r in zip(sources, new, strict=True)], report


def _report_dict(read_report) -> dict[str, Any]:
    return {"rows_read": read_report.rows_read, "rows_skipped": read_report.rows_skipped,
            "skipped": read_report.skipped}
