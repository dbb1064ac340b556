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

import random
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
        return head_cross_entropy(hidden, head, targets, self.chunk_size), n

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        """What :meth:`metrics` returns for ``examples``, known before any model runs."""
        sources = sorted({ex["source"] for ex in examples if "source" in ex})
        return [f"{kind}/{name}" for name in sources for kind in ("loss", "ppl")]

    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        """Per-source loss and perplexity (``loss/<name>``, ``ppl/<name>``; the Trainer logs
        them as ``val_loss/<name>``) when examples come from a ``data.mixture``.

        Costs one more pass over the validation set; nothing for single-source data.
        """
        from peftlab.evaluate.loss import evaluate_loss, perplexity

        by_source: dict[str, list[dict[str, Any]]] = {}
        for ex in examples:
            if "source" in ex:
                by_source.setdefault(ex["source"], []).append(ex)
        out: dict[str, float] = {}
        for name, group in sorted(by_source.items()):
            loss = evaluate_loss(model, self, group, batch_size, precision)
            out[f"loss/{name}"] = round(loss, 5)
            out[f"ppl/{name}"] = round(perplexity(loss), 3)
        return out


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` (fp32 logits) against ``targets``, in chunks.

    With a frozen ``nn.Linear`` head (LoRA and friends; also a tied embedding that is not
    trained) the gradient goes through :class:`_FrozenHeadCrossEntropy`, which keeps at most
    one chunk of logits alive. Otherwise (a trained head, or no gradient needed) each chunk
    runs through ``head`` as usual; with a gradient, autograd then keeps every chunk's logits
    until backward.
    """
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
    fused = (type(head) is nn.Linear and torch.is_grad_enabled() and hidden.requires_grad
             and not weight.requires_grad and (bias is None or not bias.requires_grad)
             and not (head._forward_hooks or head._forward_pre_hooks)
             and (autocast or weight.dtype == hidden.dtype))
    if fused:
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _FrozenHeadCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), b, targets,
                                                 chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start:start + chunk_size]).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed CE over chunks of hidden states for a frozen head (W, b), memory-bounded.

    The gradient of the summed CE w.r.t. a chunk's logits is softmax - onehot, so the forward
    turns each chunk's fp32 logits into that in place and multiplies by W right away: only
    the (tokens, hidden) input gradient is kept (the same size as the hidden states autograd
    would otherwise save), never the (tokens, vocab) logits, and backward does no head
    matmul at all. Inputs arrive in one dtype; the caller disables autocast.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            t = targets[rows]
            logits = F.linear(hidden[rows], weight, bias).float()
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            # Softmax and log-sum-exp in place: torch.logsumexp would allocate another
            # (tokens, vocab) buffer, and on CPU the page faults of a fresh 200 MB buffer
            # cost more than the arithmetic.
            peak = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
            total += (peak + sums.log()).squeeze(1).sub_(target_logits).sum()
            probs = logits.div_(sums)
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_hidden[rows] = probs.to(weight.dtype) @ weight
            del logits, probs
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        # Scale in fp32 (grad_total is e.g. 1/n, which bf16 would round).
        return (grad_hidden.float() * grad_total).to(grad_hidden.dtype), None, None, None, None


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
        from peftlab.data.packing import pack_examples

        train, report["packing"] = pack_examples(train, cfg.train.max_length)
        p = report["packing"]
        print(f"packing: {p['examples']} training examples -> {p['packed_rows']} rows of <= "
              f"{p['max_length']} tokens ({p['fill']:.0%} full)")
    return train, val, report


def _source_rows(cfg, tokenizer, model):
    """(train rows, validation rows, report, template) of ``cfg.data``'s files, cleaned,
    split and augmented; rows are ``(file row, record)``."""
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
        report["template"] = template.name
    return train_rows, val_rows, report, template


def _prepare_mixture(cfg, tokenizer, model):
    """``data.mixture``: every source prepared on its own, the training set sampled by weight
    (exact shares, peftlab.data.mixing); every example keeps its source name."""
    import dataclasses

    from peftlab.data.mixing import (
        example_stats,
        merge_stats,
        mixture_quotas,
        sample_examples,
        source_data_config,
    )
    from peftlab.data.readers import DataError

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
    from peftlab.data.mixing import (
        build_text_examples,
        example_stats,
        is_plain_text,
        merge_stats,
        read_replay_rows,
        replay_count,
        sample_examples,
    )
    from peftlab.data.readers import DataError

    data, max_length = cfg.data, cfg.train.max_length
    template = None
    if data.template is not None:
        from peftlab.data.templates import load_template

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
