"""Perplexity of a causal LM over long text with a sliding window, and a forgetting check.

A text longer than the model's context is scored in windows of ``window`` tokens that start
every ``stride`` tokens (as in the Hugging Face perplexity guide). Each token is scored
exactly once, in the window where it has the most left context: the first window scores
all its tokens, every later window only the tokens past the previous window's end.
``stride == window`` gives non-overlapping chunks (fast, but the first token of every chunk
has no context and is not scored); a smaller stride gives every scored token at least
``window - stride`` tokens of context. The very first token is never scored.

Unlike the guide's loop this is exact: every scored token counts with weight one (the guide
averages per window, then weights windows by length), and windows are batched.

Fine-tuning on a narrow task can make a model worse at everything else ("catastrophic
forgetting"). :func:`forgetting_report` measures perplexity on a general corpus (e.g. the
first N tokens of WikiText-2) so a run can report it before and after training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.models.lm import backbone_hidden_states
from peftlab.runtime.precision import autocast_for


def sliding_windows(seq_len: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: tokens ``[begin, end)`` go in, tokens
    ``[first, end)`` are scored (each predicted from the tokens before it in the window)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride} "
                         "(a larger stride would skip tokens)")
    spans = []
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == seq_len:
            break
    return spans


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, input_ids: list[int] | torch.Tensor, window: int = 512,
                      stride: int = 256, batch_size: int = 4, precision: str = "fp32",
                      pad_id: int = 0, head_chunk: int = 4096) -> dict[str, Any]:
    """Token-level perplexity of ``input_ids`` (one long sequence)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and window > limit:
        raise ValueError(f"window={window} is longer than the model's context ({limit} tokens)")
    spans = sliding_windows(len(ids), window, stride)
    head = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with autocast_for(precision):
            for start in range(0, len(spans), batch_size):
                batch = spans[start:start + batch_size]
                longest = max(end - begin for begin, end, _ in batch)
                x = torch.full((len(batch), longest), pad_id, dtype=torch.long)
                mask = torch.zeros_like(x)
                rows, cols, targets = [], [], []
                for r, (begin, end, first) in enumerate(batch):
                    x[r, :end - begin] = ids[begin:end]
                    mask[r, :end - begin] = 1
                    rows += [r] * (end - first)
                    cols += range(first - 1 - begin, end - 1 - begin)  # predicts the next token
                    targets.append(ids[first:end])
                hidden = backbone_hidden_states(model, x, mask)[rows, cols]
                target = torch.cat(targets)
                for s in range(0, len(target), head_chunk):
                    logits = head(hidden[s:s + head_chunk]).float()
                    nll += float(F.cross_entropy(logits, target[s:s + head_chunk], reduction="sum"))
                count += len(target)
    finally:
        model.train(was_training)
    mean = nll / count if count else float("nan")
    return {"perplexity": math.exp(min(mean, 50.0)) if count else float("nan"), "nll": mean,
            "tokens": count, "windows": len(spans), "window": window, "stride": stride}


def corpus_prefix_ids(path: str | Path, tokenizer: Any, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of a text file, tokenizing only as much as needed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"perplexity corpus not found: {p}")
    text = p.read_text(encoding="utf-8")
    chars = max(1024, 8 * max_tokens)
    while True:
        ids = tokenizer(text[:chars])["input_ids"]
        if len(ids) > max_tokens or chars >= len(text):  # one spare token: the cut is clean
            return list(ids[:max_tokens])
        chars *= 2


def forgetting_report(model: nn.Module, tokenizer: Any, corpus_path: str | Path,
                      max_tokens: int = 4096, window: int = 512, stride: int = 256,
                      batch_size: int = 4, precision: str = "fp32") -> dict[str, Any]:
    """Perplexity on the first ``max_tokens`` tokens of a general corpus.

    Run it before and after fine-tuning (same arguments) and compare with
    :func:`compare_forgetting`; with LoRA-style methods "before" can also be measured with
    the adapter disabled.
    """
    ids = corpus_prefix_ids(corpus_path, tokenizer, max_tokens)
    report = perplexity_of_ids(model, ids, window=window, stride=stride, batch_size=batch_size,
                               precision=precision, pad_id=_pad_id(tokenizer))
    return {"corpus": str(corpus_path), "max_tokens": max_tokens, **report}


def compare_forgetting(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Perplexity before/after and the relative change (+0.05 = 5% worse after training)."""
    keys = ("corpus", "max_tokens", "window", "stride", "tokens")
    if any(before.get(k) != after.get(k) for k in keys):
        raise ValueError("before and after were measured differently: "
                         + ", ".join(f"{k}={before.get(k)!r}/{after.get(k)!r}" for k in keys
                                     if before.get(k) != after.get(k)))
    return {"corpus": before.get("corpus"), "tokens": before["tokens"],
            "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "relative_change": after["perplexity"] / before["perplexity"] - 1.0}


def _pad_id(tokenizer: Any) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0
