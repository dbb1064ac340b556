"""In-context k-shot classification: the base model's baseline for k-shot training.

The prompt is k demonstrations per class, each the verbalizer prompt filled in and followed
by its label word, separated by blank lines, then the evaluation row's own prompt::

    Review: a gorgeous film\\nSentiment: positive

    Review: dull and overlong\\nSentiment: negative

    Review: {text}\\nSentiment:

A row is classified exactly as ``classification.mode: verbalizer`` classifies it: the
next-token distribution after the prompt, read at the first token of every label word
(``meta["label_token_ids"]``, the ids the trained task uses). The scores returned are
log-probabilities over the whole vocabulary; the trained task's logits differ from them by a
per-row constant, so the argmax (the prediction) is the same. With no demonstrations (k=0) the
inputs are token for token the trained task's inputs, so this is the zero-shot baseline.

Efficiency: the demonstrations are the same for every row. They run through the model once
(``use_cache=True``) and each batch continues from a copy of that KV cache, so a row costs
only its own tokens, not the ~2k tokens of a 64-shot prefix.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.data.classification import LabelledRow, encode_prompt, render_template
from peftlab.data.readers import DataError
from peftlab.evaluation.metrics import classification_report
from peftlab.models.kv_cache import cache_kwargs, output_cache
from peftlab.runtime.precision import autocast_for
from peftlab.tasks.classification.task import (
    classification_meta,
    make_encoder,
    read_classification_rows,
)

SEPARATOR = "\n\n"  # between demonstrations, and before the evaluated row's prompt


@dataclass
class InContextInputs:
    """Token ids: the shared prefix (run once) and, per row, what follows it."""

    prefix_ids: list[int]
    query_ids: list[list[int]]
    demonstrations: list[LabelledRow]  # in prompt order
    prefix_text: str = ""  # the demonstrations as text (for the report)


def order_demonstrations(demos: list[LabelledRow], seed: int) -> list[LabelledRow]:
    """Demonstrations in a seeded order whose classes interleave.

    Each class's rows are shuffled; the prompt then takes one row of every class per round, in
    a freshly shuffled class order each round. Runs of one class (which pull the prediction
    towards that class, the recency bias) are at most 2 long, and there is no fixed cycle for
    the model to continue. Depends only on the rows' content and the seed, not on their order.
    """
    rng = random.Random(f"peftlab-in-context:{seed}")
    by_class: dict[str, list[LabelledRow]] = {}
    for d in sorted(demos, key=lambda r: (str(r.label), r.text, r.text_pair or "")):
        by_class.setdefault(str(d.label), []).append(d)
    for members in by_class.values():
        rng.shuffle(members)
    ordered: list[LabelledRow] = []
    for i in range(max((len(m) for m in by_class.values()), default=0)):
        classes = [c for c in sorted(by_class) if i < len(by_class[c])]
        rng.shuffle(classes)
        ordered += [by_class[c][i] for c in classes]
    return ordered


def format_demonstration(row: LabelledRow, template: str, word: str) -> str:
    """The filled-in prompt followed by the label word, spaced as ``label_token_ids`` assumes."""
    prompt = render_template(template, row.text, row.text_pair)
    sep = "" if prompt[-1:].isspace() or word[:1].isspace() else " "
    return prompt + sep + word


def encode_in_context(tokenizer, meta: dict[str, Any], demos: list[LabelledRow],
                      rows: list[LabelledRow], seed: int = 0) -> InContextInputs:
    """Tokenize the demonstration prefix and every row's continuation.

    A row's continuation starts with the blank line (``"\\n\\n" + prompt``, no special
    tokens), so the split between prefix and row falls after the last label word, where
    byte-level BPE splits words anyway: prefix + continuation are the tokens the whole prompt
    would get. Rows are truncated to ``meta["max_length"]`` as in the trained task.
    """
    template, max_length = meta["prompt_template"], meta["max_length"]
    if not demos:  # zero-shot: exactly the trained task's inputs
        encode = make_encoder(meta, tokenizer)
        pairs = [r.text_pair or "" for r in rows] if any(r.text_pair for r in rows) else None
        encoded = encode([r.text for r in rows], pairs) if rows else []
        return InContextInputs([], [e.input_ids for e in encoded], [])
    words = meta["verbalizer"]
    for d in demos:
        if d.label not in words:
            raise DataError(f"{d.source}:{d.row}: demonstration label {d.label!r} is not one of "
                            f"{list(words)}")
    ordered = order_demonstrations(demos, seed)
    text = SEPARATOR.join(format_demonstration(d, template, words[d.label]) for d in ordered)
    prefix = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None and len(prefix) > 1 and prefix[-1] == tokenizer.eos_token_id:
        prefix = prefix[:-1]  # a tokenizer that appends EOS would end the text before the row
    queries = [encode_prompt(tokenizer, SEPARATOR + template, r.text, r.text_pair, max_length,
                             add_special_tokens=False).input_ids for r in rows]
    return InContextInputs(prefix, queries, ordered, text)


@torch.no_grad()
def label_logprobs(model: nn.Module, prefix_ids: list[int], query_ids: list[list[int]],
                   label_token_ids: list[int], batch_size: int = 8, pad_id: int = 0,
                   precision: str = "fp32") -> torch.Tensor:
    """log p(first token of each label word | prefix + query), shape (n_queries, n_labels), fp32.

    The prefix runs once with ``use_cache=True``. Every batch continues from a deep copy of
    that cache repeated to the batch size (``DynamicCache.update`` replaces its tensors by
    concatenation, so the copy keeps the shared cache intact). Queries are right-padded: with
    the cache, position ids run on from the prefix length, which is right for every real token;
    padding only follows a row's last token, which is where its score is read.
    Each batch holds ``batch_size`` copies of the prefix cache (SmolLM2-135M: ~46 KB per
    token and row in fp32, so ~0.7 GB for 8 rows of a 2k-token 64-shot prefix).
    """
    backbone = model.base_model if model.base_model is not model else None
    if backbone is None:
        raise TypeError(f"{type(model).__name__}: cannot find the transformer backbone "
                        "(expected a transformers *ForCausalLM model)")
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    label_ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=device)
    out = torch.empty(len(query_ids), len(label_token_ids))
    if any(len(q) == 0 for q in query_ids):
        raise ValueError("an in-context query has no tokens")
    was_training = model.training
    model.eval()
    with autocast_for(precision):
        cache, n_prefix = None, len(prefix_ids)
        if prefix_ids:
            cache = output_cache(backbone(input_ids=torch.tensor([prefix_ids], device=device),
                                          use_cache=True))
        order = sorted(range(len(query_ids)), key=lambda i: len(query_ids[i]))  # less padding
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            n, longest = len(idx), max(len(query_ids[i]) for i in idx)
            input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
            mask = torch.zeros((n, n_prefix + longest), dtype=torch.long)
            mask[:, :n_prefix] = 1
            for row, i in enumerate(idx):
                q = query_ids[i]
                input_ids[row, :len(q)] = torch.as_tensor(q, dtype=torch.long)
                mask[row, n_prefix:n_prefix + len(q)] = 1
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(n)
            hidden = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                              **cache_kwargs(backbone, past), use_cache=past is not None)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            last = torch.tensor([len(query_ids[i]) - 1 for i in idx], device=hidden.device)
            h = hidden[torch.arange(n, device=hidden.device), last]
            logp = head(h).float().log_softmax(-1)  # the LM head on one position per row
            out[idx] = logp[:, label_ids.to(logp.device)].cpu()
    model.train(was_training)
    return out


def context_length(model: nn.Module) -> int | None:
    """The model's maximum number of positions, if its config says."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None)


def in_context_classify(model: nn.Module, tokenizer, meta: dict[str, Any],
                        demos: list[LabelledRow], rows: list[LabelledRow], *, seed: int = 0,
                        batch_size: int = 8, precision: str = "fp32") -> dict[str, Any]:
    """Classify labelled ``rows`` with ``demos`` as in-context demonstrations (k-shot prompt).

    ``meta`` is a verbalizer task's labels.json content (``classification_meta``): template,
    label words and label token ids, so scores are comparable with a trained verbalizer run.
    Returns the classification report (accuracy, macro_f1, per class, confusion matrix) plus
    ``k``, ``predictions`` (label strings), ``label_logprobs``, the demonstrations' text
    (``prompt_prefix``) and its token count (``prefix_tokens``).
    """
    if meta.get("mode") != "verbalizer":
        raise ValueError("in-context classification needs classification.mode: verbalizer "
                         f"(labels.json mode is {meta.get('mode')!r})")
    labels: list[str] = list(meta["labels"])
    index = {label: i for i, label in enumerate(labels)}
    for r in rows:
        if r.label not in index:
            raise DataError(f"{r.source}:{r.row}: label {r.label!r} is not one of {labels}")
    k = max(Counter(d.label for d in demos).values(), default=0)
    inputs = encode_in_context(tokenizer, meta, demos, rows, seed)
    longest = max((len(q) for q in inputs.query_ids), default=0)
    total = len(inputs.prefix_ids) + longest
    limit = context_length(model)
    if limit is not None and total > limit:
        raise ValueError(f"in-context k={k} ({len(demos)} demonstrations): the prompt needs "
                         f"{total} tokens ({len(inputs.prefix_ids)} of demonstrations + "
                         f"{longest} of the longest row) but the model's context is {limit} "
                         "tokens; use a smaller k")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = label_logprobs(model, inputs.prefix_ids, inputs.query_ids, meta["label_token_ids"],
                            batch_size=batch_size, pad_id=pad_id, precision=precision)
    pred = scores.argmax(-1)
    report = classification_report([index[r.label] for r in rows], pred, labels)
    report.update(k=k, demonstrations=len(demos), prefix_tokens=len(inputs.prefix_ids),
                  prompt_prefix=inputs.prefix_text, predictions=[labels[int(p)] for p in pred],
                  label_logprobs=scores.tolist())
    return report


def in_context_baseline(cfg, model: nn.Module, tokenizer, k: int | None = None,
                        batch_size: int | None = None, precision: str = "fp32") -> dict[str, Any]:
    """The in-context baseline of a ``task: classification`` (verbalizer) run config.

    Demonstrations are the k-shot training rows the trained run would use (``data.k_shot``,
    or ``k`` if given; 0 is zero-shot), evaluated on the run's validation rows.
    """
    k = cfg.data.k_shot if k is None else k
    if k is None or k < 0:
        raise ValueError(f"in-context baseline: k must be >= 0 (or set data.k_shot), got {k}")
    data = dataclasses.replace(cfg.data, k_shot=k or None)
    demos, val_rows, labels, _ = read_classification_rows(dataclasses.replace(cfg, data=data))
    if not val_rows:
        raise DataError("in-context baseline: no validation rows (set data.validation or "
                        "data.validation_split)")
    meta = classification_meta(cfg, labels, tokenizer)
    return in_context_classify(model, tokenizer, meta, demos if k else [], val_rows,
                               seed=cfg.train.seed, batch_size=batch_size or cfg.eval.batch_size,
                               precision=precision)
