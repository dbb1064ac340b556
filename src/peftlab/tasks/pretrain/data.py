"""Data for ``task: pretrain``: documents read, held out by document, tokenized, blocked.

Order: read documents (peftlab.data.documents), hold out whole documents
(``data.validation_split``, seeded) unless ``data.validation`` names a file, tokenize, cut
into ``train.max_length`` blocks, add ``data.replay`` blocks to the training set. Masked-LM
validation blocks are masked once here (seeded), so every evaluation scores the same
targets; training blocks are masked per batch by the task.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from peftlab.config import ConfigError, RunConfig
from peftlab.data.documents import (
    Document,
    block_stats,
    causal_blocks,
    masked_blocks,
    read_documents,
    tokenize_documents,
)
from peftlab.data.masking import mask_tokens
from peftlab.data.mixing import read_replay_rows, replay_count
from peftlab.data.readers import DataError
from peftlab.data.splits import split_off

# data.* options of other tasks that would be silently ignored here.
_UNSUPPORTED = {
    "packing": "blocks are always packed (see pretrain.reset_attention)",
    "mixture": "use data.replay for general text",
    "template": "raw text has no prompt template",
    "k_shot": "a classification option",
}


def check_data_options(cfg: RunConfig) -> None:
    """Refuse ``data.*`` options that mean nothing for raw text (one line naming the key)."""
    data = cfg.data
    for key, why in _UNSUPPORTED.items():
        if getattr(data, key):
            raise ConfigError(f"data.{key} does not apply to task: pretrain ({why})")
    if data.augment.method != "none":
        raise ConfigError("data.augment does not apply to task: pretrain")
    clean = data.clean
    if (clean.normalize or clean.dedup or clean.near_dedup or clean.min_tokens
            or clean.max_tokens is not None or clean.leakage):
        raise ConfigError("data.clean does not apply to task: pretrain yet (clean the text file "
                          "first)")
    if not data.train:
        raise DataError("data.train: no training file given")


def prepare_pretrain_data(cfg: RunConfig, tokenizer: Any,
                          objective: str) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(training blocks, validation blocks, data report) for ``objective`` clm or mlm."""
    check_data_options(cfg)
    data, pcfg, seed = cfg.data, cfg.task_config, cfg.train.seed
    read = dict(text_field=data.text_field, document_field=pcfg.document_field,
                txt_split=pcfg.txt_split, on_error=data.on_error)
    docs, train_file = read_documents(data.train, max_rows=data.max_rows, **read)
    report: dict[str, Any] = {"objective": objective, "train_file": train_file}
    if data.validation:
        val_docs, report["validation_file"] = read_documents(data.validation, **read)
        train_docs = docs
    else:
        try:
            train_docs, val_docs = split_off(docs, data.validation_split, seed)
        except ValueError as err:
            raise DataError(f"{data.train}: {err} (documents: {len(docs)})") from None
        if val_docs:
            report["held_out"] = {"validation_split": data.validation_split,
                                  "documents": len(val_docs),
                                  "first": [d.where for d in val_docs[:5]]}
    blocks = Blocks(cfg, tokenizer, objective)
    train, report["train"] = blocks.build(train_docs)
    val, report["validation"] = blocks.build(val_docs)
    if objective == "mlm" and val:
        val = mask_once(val, cfg.task_config.mlm_probability, tokenizer.mask_token_id,
                        len(tokenizer), seed)
    if data.replay and data.replay_ratio > 0:
        train = _add_replay(train, report, blocks, cfg)
    _print_summary(report)
    return train, val, report


class Blocks:
    """Tokenize documents and cut them into blocks for one objective."""

    def __init__(self, cfg: RunConfig, tokenizer: Any, objective: str):
        self.objective, self.tokenizer = objective, tokenizer
        self.pcfg, self.size = cfg.task_config, cfg.train.max_length
        if objective == "clm":
            if tokenizer.eos_token_id is None:
                raise ConfigError("pretrain: the tokenizer has no EOS token to end documents "
                                  "with")
        else:
            missing = [t for t in ("mask_token", "cls_token", "sep_token")
                       if getattr(tokenizer, f"{t}_id", None) is None]
            if missing:
                raise ConfigError(f"pretrain.objective: mlm needs a tokenizer with "
                                  f"{', '.join(missing)} (a BERT-style encoder); use clm for "
                                  "decoders")

    def build(self, docs: list[Document]) -> tuple[list[dict], dict[str, Any]]:
        if not docs:
            return [], {"kept": 0, "rows": 0, "documents": 0, "tokens": 0, "blocks": 0}
        if self.objective == "clm":
            ids = [d["ids"] for d in tokenize_documents(docs, self.tokenizer)]
            rows = causal_blocks(ids, self.size, self.tokenizer.eos_token_id,
                                 self.pcfg.reset_attention)
            stats = block_stats(ids, rows, self.size)
        else:
            tokens = tokenize_documents(docs, self.tokenizer, self.pcfg.whole_word_masking)
            rows = masked_blocks(tokens, self.size, self.tokenizer.cls_token_id,
                                 self.tokenizer.sep_token_id)
            stats = block_stats(tokens, rows, self.size)
        return rows, {"kept": len(rows), "rows": len(rows), **stats}



def mask_once(rows: list[dict], probability: float, mask_id: int, vocab_size: int,
              seed: int) -> list[dict]:
    """Masked-LM blocks with fixed masks (``input_ids`` masked, ``labels`` set), seeded: the
    same targets at every evaluation and in every run with this seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        starts = torch.tensor([row["word_starts"]]) if "word_starts" in row else None
        masked, labels = mask_tokens(ids, torch.tensor([row["special"]]) == 0, probability,
                                     mask_id, vocab_size, starts, gen)
        out.append({"input_ids": masked[0].tolist(), "labels": labels[0].tolist()})
    return out


def _add_replay(train: list[dict], report: dict[str, Any], blocks: Blocks,
                cfg: RunConfig) -> list[dict]:
    """Blocks of ``data.replay`` text so they are ``data.replay_ratio`` of the training
    tokens (rows in a seeded order, repeated if the file is too short)."""
    data = cfg.data
    rows = read_replay_rows(data.replay, data)
    docs = []
    for row, record in rows:
        text = record.get(data.text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{data.replay}:{row}: field {data.text_field!r} must be a non-empty "
                            "string (replay for task: pretrain is plain text)")
        docs.append(Document(f"{data.replay}:{row}", text))
    random.Random(f"peftlab-replay:{cfg.train.seed}").shuffle(docs)
    domain_tokens = sum(len(r["input_ids"]) for r in train)
    need = replay_count(domain_tokens, data.replay_ratio)
    picked: list[Document] = []
    tokens = 0
    position = 0
    while tokens < need:
        doc = docs[position % len(docs)]
        picked.append(doc)
        tokens += len(blocks.tokenizer(doc.text, add_special_tokens=False,
                                       verbose=False)["input_ids"])
        position += 1
    replay, stats = blocks.build(picked)
    for row in replay:
        row["source"] = "replay"
    replay_tokens = sum(len(r["input_ids"]) for r in replay)
    report["replay"] = {"path": data.replay, "ratio": data.replay_ratio, "rows": len(rows),
                        "documents_used": len(picked),
                        "repeated": max(0, len(picked) - len(docs)), **stats,
                        "share_of_tokens": round(replay_tokens / (replay_tokens + domain_tokens),
                                                 4)}
    train = train + replay
    random.Random(f"peftlab-replay:{cfg.train.seed}").shuffle(train)
    report["train"] = {**report["train"], "kept": len(train), "rows": len(train),
                       "replay_blocks": len(replay)}
    return train


def _print_summary(report: dict[str, Any]) -> None:
    for split in ("train", "validation"):
        s = report[split]
        if s.get("documents"):
            print(f"pretrain ({report['objective']}) {split}: {s['documents']} documents, "
                  f"{s['tokens']:,} tokens -> {s['blocks']} blocks of <= {s['block_size']} "
                  f"tokens ({s['fill']:.0%} full)")
    r = report.get("replay")
    if r:
        print(f"replay: {r['blocks']} blocks ({r['tokens']:,} tokens, {r['share_of_tokens']:.0%} "
              f"of the training tokens) from {r['documents_used']} rows of {r['path']}")
