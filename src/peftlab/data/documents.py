"""Raw text for continued pre-training: documents read, tokenized and cut into blocks.

A *document* is the unit that is kept whole when data is split (``data.validation_split``
holds out whole documents, so no document is on both sides): a line or a blank-line
separated paragraph of a ``.txt`` file, a row of a record file (its ``text`` field), or all
rows that share a ``document_field`` value (e.g. the sentences of one contract), joined by
newlines in file order.

Blocks (``train.max_length`` tokens): documents are concatenated and cut, so no token is
dropped and almost no position is padding (only the last block is short).

* Causal LM (:func:`causal_blocks`): every document ends with EOS. With ``reset`` each piece
  of a document inside a block is its own segment: ``position_ids`` restart at 0 and
  transformers then masks attention block-diagonally (peftlab.data.packing), so a token
  never attends to another document and a block's loss equals the summed losses of its
  segments run alone. The first token of a segment has nothing before it and is not
  predicted (label -100), as for an unpacked sequence. Without ``reset`` a block is one
  sequence (GPT-style: attention crosses the EOS between documents).
* Masked LM (:func:`masked_blocks`): documents are joined with the separator token (SEP) and
  each block is ``[CLS] piece [SEP]`` (RoBERTa's FULL-SENTENCES packing: attention crosses
  document boundaries; BERT-style encoders have no position-reset detection).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.readers import (
    TEXT_SUFFIXES,
    DataError,
    read_records,
    read_text_documents,
    skip_or_raise,
)

TOKENIZE_BATCH = 256  # documents per tokenizer call


@dataclass
class Document:
    """One document's text and where it came from (``file:row`` or ``file:rows a..b``)."""

    where: str
    text: str


def read_documents(path: str | Path, text_field: str = "text", document_field: str | None = None,
                   txt_split: str = "auto", on_error: str = "raise",
                   max_rows: int | None = None) -> tuple[list[Document], dict[str, Any]]:
    """Documents of a ``.txt``/``.raw`` file or of a record file's ``text_field``.

    ``document_field`` groups the rows of a record file into documents (rows with the same
    value, joined by newlines in file order). A row without a usable text (or group) field
    raises a DataError naming file, row and field, or with ``on_error: skip`` is counted in
    the report. ``max_rows`` limits the rows (lines of a text file) read.
    """
    name = str(path)
    if Path(path).suffix.lower() in TEXT_SUFFIXES:
        if document_field is not None:
            raise DataError(f"{name}: a document field ({document_field!r}) only applies to "
                            "record files (.jsonl, .json, .csv, .tsv, .parquet), not plain text")
        pieces = read_text_documents(path, txt_split)[:max_rows]
        docs = [Document(f"{name}:{line}", text) for line, text in pieces]
        return docs, {"path": name, "format": "text", "rows_read": len(docs), "rows_skipped": 0,
                      "documents": len(docs)}
    records, read_report = read_records(path, on_error=on_error, max_rows=max_rows)
    errors = list(read_report.skipped)
    skipped = read_report.rows_skipped
    groups: dict[str, list[tuple[int, str]]] = {}
    for row, record in zip(read_report.row_numbers, records, strict=True):
        text = record.get(text_field)
        problem = None
        if not isinstance(text, str) or not text.strip():
            fields = ", ".join(map(str, record)) or "no fields"
            problem = (f"{name}:{row}: field {text_field!r} must be a non-empty string, got "
                       f"{text!r:.40} (the row has: {fields})")
        elif document_field is not None and record.get(document_field) is None:
            problem = f"{name}:{row}: document field {document_field!r} is missing or null"
        if problem is not None:
            skip_or_raise(DataError(problem), on_error, errors)
            skipped += 1
            continue
        key = (str(row) if document_field is None
               else json.dumps(record[document_field], sort_keys=True, default=str))
        groups.setdefault(key, []).append((row, text.strip()))
    if not groups:
        raise DataError(f"{name}: no usable documents ({skipped} rows skipped"
                        + (f"; first problem: {errors[0]})" if errors else ")"))
    docs = []
    for rows in groups.values():
        first, last = rows[0][0], rows[-1][0]
        where = f"{name}:{first}" if first == last else f"{name}:rows {first}..{last}"
        docs.append(Document(where, "\n".join(text for _, text in rows)))
    return docs, {"path": name, "format": "records", "rows_read": len(records) - skipped,
                  "rows_skipped": skipped, "skipped": errors, "documents": len(docs)}


def tokenize_documents(docs: list[Document], tokenizer: Any,
                       word_starts: bool = False) -> list[dict[str, list]]:
    """``{"ids"[, "word_starts"]}`` per document, without special tokens.

    ``word_starts`` (whole-word masking) marks the first token of every word, from a fast
    tokenizer's word ids (a word is what its pre-tokenizer splits off).
    """
    if word_starts and not getattr(tokenizer, "is_fast", False):
        raise ValueError("whole-word masking needs a fast tokenizer (its word ids tell which "
                         f"tokens form a word); {type(tokenizer).__name__} is not one")
    out: list[dict[str, list]] = []
    for start in range(0, len(docs), TOKENIZE_BATCH):
        chunk = docs[start:start + TOKENIZE_BATCH]
        # verbose=False: documents are longer than the model's context on purpose (cut later)
        enc = tokenizer([d.text for d in chunk], add_special_tokens=False, verbose=False)
        for i, ids in enumerate(enc["input_ids"]):
            item: dict[str, list] = {"ids": list(ids)}
            if word_starts:
                words = enc.word_ids(i)
                item["word_starts"] = [j == 0 or w is None or w != words[j - 1]
                                       for j, w in enumerate(words)]
            out.append(item)
    return out


def causal_blocks(docs: list[list[int]], block_size: int, eos_id: int,
                  reset: bool = True) -> list[dict[str, list[int]]]:
    """Documents + EOS, concatenated and cut into rows of at most ``block_size`` tokens.

    Rows are ``{"input_ids", "labels"}``, plus ``position_ids`` (restarting at every segment)
    with ``reset``. See the module docstring.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def close() -> None:
        if ids:
            row = {"input_ids": list(ids), "labels": list(labels)}
            if reset:
                row["position_ids"] = list(positions)
            rows.append(row)
            ids.clear()
            labels.clear()
            positions.clear()

    for doc in docs:
        tokens = list(doc) + [eos_id]
        while tokens:
            piece, tokens = tokens[:block_size - len(ids)], tokens[block_size - len(ids):]
            if reset:
                labels.extend([IGNORE_INDEX] + piece[1:])
                positions.extend(range(len(piece)))
            else:
                labels.extend(piece)
            ids.extend(piece)
            if len(ids) == block_size:
                close()
    close()
    return rows


def masked_blocks(docs: list[dict[str, list]], block_size: int, cls_id: int,
                  sep_id: int) -> list[dict[str, list]]:
    """Documents joined by SEP and cut into ``[CLS] piece [SEP]`` rows of ``block_size``.

    Rows are ``{"input_ids", "special"}`` (1 = never masked: CLS and every SEP), plus
    ``word_starts`` when the documents carry them.
    """
    if block_size < 3:
        raise ValueError(f"block_size must be >= 3 ([CLS] token [SEP]), got {block_size}")
    whole_words = bool(docs) and "word_starts" in docs[0]
    stream: list[int] = []
    special: list[int] = []
    starts: list[bool] = []
    for doc in docs:
        stream += doc["ids"] + [sep_id]
        special += [0] * len(doc["ids"]) + [1]
        if whole_words:
            starts += doc["word_starts"] + [True]
    inner = block_size - 2
    rows = []
    for begin in range(0, len(stream), inner):
        piece = stream[begin:begin + inner]
        if not any(s == 0 for s in special[begin:begin + inner]):
            continue  # only separators (a trailing SEP): nothing to predict
        row: dict[str, list] = {"input_ids": [cls_id, *piece, sep_id],
                                "special": [1, *special[begin:begin + inner], 1]}
        if whole_words:
            row["word_starts"] = [True, *starts[begin:begin + inner], True]
        rows.append(row)
    return rows


def block_stats(docs: list[list[int]] | list[dict[str, list]], rows: list[dict[str, list]],
                block_size: int) -> dict[str, Any]:
    """Documents, tokens (without special tokens), blocks and how full the blocks are."""
    tokens = sum(len(d["ids"] if isinstance(d, dict) else d) for d in docs)
    used = sum(len(r["input_ids"]) for r in rows)
    return {"documents": len(docs), "tokens": tokens, "blocks": len(rows),
            "block_size": block_size,
            "fill": round(used / (len(rows) * block_size), 4) if rows else 0.0}
