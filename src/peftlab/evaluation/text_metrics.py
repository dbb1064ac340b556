"""Reference-based metrics for generated text: ROUGE-1/2/L, exact match, corpus BLEU-4.

* ROUGE: F1 from the ``rouge-score`` package (Google's re-implementation of ROUGE-1.5.5)
  with Porter stemming, averaged over examples (no bootstrap); rougeL is sentence-level LCS.
* Exact match: SQuAD normalisation (lower case, no punctuation, no articles a/an/the,
  single spaces) before comparing.
* BLEU: our own corpus BLEU-4 (Papineni et al., 2002): clipped n-gram counts summed over
  the corpus, geometric mean of the four precisions, brevity penalty
  ``exp(1 - ref_len / hyp_len)`` when the output is shorter. Lower-cased, words and
  punctuation split by a regex; this is close to, but not the same as, sacreBLEU's 13a
  tokenizer, so compare BLEU only between runs of peftlab. No smoothing: any zero
  precision makes the corpus BLEU 0, as in the original definition.

:func:`generation_report` generates answers for tokenized SFT examples (prompt = the
tokens before the first label, reference = the labelled tokens) and scores them, so it works
for chat templates and ``data.template`` alike.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

import torch
from torch import nn

from peftlab.evaluation.generate import generate_tokens, stop_token_ids
from peftlab.runtime.distributed import World

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_BLEU_TOKENS = re.compile(r"\w+|[^\w\s]")


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize_answer`."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r)
               for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def rouge(predictions: list[str], references: list[str],
          use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (``rouge1``, ``rouge2``, ``rougeL``) over the examples."""
    from rouge_score import rouge_scorer  # imports nltk (~1 s): only when ROUGE is asked for

    _check(predictions, references)
    keys = ("rouge1", "rouge2", "rougeL")
    if not predictions:
        return dict.fromkeys(keys, 0.0)
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    totals = dict.fromkeys(keys, 0.0)
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)  # score(target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


def bleu_tokens(text: str) -> list[str]:
    return _BLEU_TOKENS.findall(text.lower())


def corpus_bleu(predictions: list[str], references: list[str] | list[list[str]],
                max_order: int = 4) -> dict[str, Any]:
    """Corpus BLEU with one or more references per prediction.

    Returns ``bleu``, the modified ``precisions`` (1..max_order), ``brevity_penalty``,
    ``hyp_length`` and ``ref_length`` (the reference closest in length, ties to the shorter).
    """
    _check(predictions, references)
    matches = [0] * max_order
    possible = [0] * max_order
    hyp_len = ref_len = 0
    for pred, refs in zip(predictions, references, strict=True):
        ref_list = [refs] if isinstance(refs, str) else list(refs)
        hyp = bleu_tokens(pred)
        ref_toks = [bleu_tokens(r) for r in ref_list]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_toks)[1]
        for n in range(1, max_order + 1):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in ref_toks:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            possible[n - 1] += max(len(hyp) - n + 1, 0)
    precisions = [m / p if p else 0.0 for m, p in zip(matches, possible, strict=True)]
    if hyp_len == 0 or min(precisions) == 0.0:
        score = 0.0
    else:
        score = math.exp(sum(math.log(p) for p in precisions) / max_order)
    bp = 1.0 if hyp_len > ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    return {"bleu": score * bp, "precisions": precisions, "brevity_penalty": bp,
            "hyp_length": hyp_len, "ref_length": ref_len}


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """``rouge1``, ``rouge2``, ``rougeL``, ``exact_match`` and ``bleu`` in one dict."""
    out = rouge(predictions, references)
    out["exact_match"] = exact_match(predictions, references)
    out["bleu"] = corpus_bleu(predictions, references)["bleu"]
    return out


def split_prompt_reference(example: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """(prompt ids = tokens before the first label, reference ids = the first labelled turn)."""
    labels = example["labels"]
    first = next((i for i, t in enumerate(labels) if t != -100), None)
    if first is None or first == 0:
        raise ValueError("example has no labelled tokens" if first is None else
                         "example has no prompt (its first token is labelled)")
    end = next((i for i in range(first, len(labels)) if labels[i] == -100), len(labels))
    return list(example["input_ids"][:first]), list(example["input_ids"][first:end])


@torch.no_grad()
def generation_report(model: nn.Module, tokenizer: Any, examples: list[dict[str, list[int]]],
                      max_new_tokens: int = 64, batch_size: int = 8,
                      max_examples: int | None = None,
                      samples: int | None = 5,
                      world: World | None = None) -> dict[str, Any] | None:
    """Greedy answers for tokenized SFT examples, scored against their labelled answers.

    With a ``world`` of several ranks (every rank calls this) each answers every ``size``-th
    batch of the one-process batching and rank 0 gathers and scores all of them: the same
    answers, 1/size of the decoding per rank. Other ranks return None.

    Only the first answer of a multi-turn example is used (the later turns' prompts would
    need the model's own earlier answers). Returns the metrics plus ``samples`` (prompt,
    reference, prediction) for the first ``samples`` examples (None: all, in order).
    """
    examples = examples[:max_examples] if max_examples else examples
    pairs = [split_prompt_reference(ex) for ex in examples]
    stop = set(stop_token_ids(tokenizer))
    refs = [tokenizer.decode([t for t in ref if t not in stop], skip_special_tokens=True).strip()
            for _, ref in pairs]
    rows = sharded_generate(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens,
                            batch_size, world or World())
    if rows is None:
        return None
    preds = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    report: dict[str, Any] = {"examples": len(pairs), **text_metrics(preds, refs)}
    report["samples"] = [
        {"prompt": tokenizer.decode(pairs[i][0], skip_special_tokens=False),
         "reference": refs[i], "prediction": preds[i]}
        for i in range(len(pairs) if samples is None else min(samples, len(pairs)))
    ]
    return report


def sharded_generate(model: nn.Module, tokenizer: Any, prompts: list[list[int]],
                     max_new_tokens: int, batch_size: int,
                     world: World) -> list[list[int]] | None:
    """:func:`generate_tokens` with the length-sorted batches dealt to the ranks; rank 0 gets
    every row in prompt order, other ranks None. Each rank's batches are exactly the ones one
    process would form (``generate_tokens`` sorts by length too, stably)."""
    if world.size == 1:
        return generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    mine = world.shard(batches)
    flat = [i for b in mine for i in b]
    rows = generate_tokens(model, tokenizer, [prompts[i] for i in flat], max_new_tokens,
                           batch_size) if flat else []
    done, answered = 0, []
    for b in mine:
        answered.append(list(zip(b, rows[done:done + len(b)], strict=True)))
        done += len(b)
    gathered = world.gather(answered)
    if gathered is None:
        return None
    out: list[list[int]] = [[] for _ in prompts]
    for batch in gathered:
        for i, row in batch:
            out[i] = row
    return out


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check(predictions: list, references: list) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
