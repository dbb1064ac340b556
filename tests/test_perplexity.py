"""Sliding-window perplexity against direct computation, and the forgetting report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.evaluation.perplexity import (
    compare_forgetting,
    corpus_prefix_ids,
    forgetting_report,
    perplexity_of_ids,
    sliding_windows,
)

from .conftest import SHARED_DATA

WIKITEXT = SHARED_DATA / "wikitext2_raw" / "wiki.test.raw"


def test_sliding_windows_score_every_token_once():
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, window, stride in [(1, 4, 2), (7, 7, 3), (50, 8, 3), (33, 16, 15), (5, 9, 1)]:
        scored = [t for _, end, first in sliding_windows(n, window, stride)
                  for t in range(first, end)]
        assert scored == list(range(1, n)), (n, window, stride)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


def test_stride_equal_window_gives_non_overlapping_chunks():
    spans = sliding_windows(10, 4, 4)
    assert spans == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert sum(end - first for _, end, first in spans) == 10 - 3  # chunk starts unscored


@pytest.fixture(scope="module")
def tiny(tiny_chat_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval(), tok


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _nll_sum(model, ids: torch.Tensor, first: int = 1) -> tuple[float, int]:
    """Summed NLL of tokens ``first..`` of ``ids`` from one plain forward pass."""
    logits = model(input_ids=ids[None]).logits[0, :-1].float()
    losses = F.cross_entropy(logits, ids[1:], reduction="none")[first - 1:]
    return float(losses.sum()), len(losses)


def test_single_window_equals_exp_mean_nll(tiny):
    model, _ = tiny
    ids = _ids(40)
    nll, n = _nll_sum(model, ids)
    out = perplexity_of_ids(model, ids, window=64, stride=32)
    assert out["tokens"] == n == 39 and out["windows"] == 1
    assert_close(out["perplexity"], math.exp(nll / n), rtol=1e-5, atol=0)


def test_sliding_window_equals_per_window_forwards(tiny):
    model, _ = tiny
    ids = _ids(70, seed=1)
    total, count = 0.0, 0
    for begin, end, first in sliding_windows(70, 16, 6):
        nll, n = _nll_sum(model, ids[begin:end], first - begin)
        total, count = total + nll, count + n
    for batch_size in (1, 3, 32):
        out = perplexity_of_ids(model, ids, window=16, stride=6, batch_size=batch_size)
        assert out["tokens"] == count == 69
        assert_close(out["nll"], total / count, rtol=1e-5, atol=0)


def test_non_overlapping_chunks_equal_separate_chunks(tiny):
    model, _ = tiny
    ids = _ids(50, seed=2)
    parts = [_nll_sum(model, ids[s:s + 16]) for s in range(0, 50, 16)]
    out = perplexity_of_ids(model, ids, window=16, stride=16, batch_size=2)
    assert out["tokens"] == sum(n for _, n in parts) == 50 - 4
    assert_close(out["nll"], sum(x for x, _ in parts) / out["tokens"], rtol=1e-5, atol=0)
    more_context = perplexity_of_ids(model, ids, window=16, stride=4)
    assert more_context["tokens"] == 49
    with pytest.raises(ValueError, match="longer than the model's context"):
        perplexity_of_ids(model, ids, window=1024, stride=512)


def test_forgetting_report_on_a_text_file(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "corpus.txt"
    path.write_text(" = Title = \n\n The quick brown fox jumps over the lazy dog . \n" * 40)
    ids = corpus_prefix_ids(path, tok, 100)
    assert ids == tok(path.read_text())["input_ids"][:100]
    before = forgetting_report(model, tok, path, max_tokens=100, window=32, stride=16)
    assert before["tokens"] == 99 and before["corpus"] == str(path)
    assert_close(before["perplexity"], perplexity_of_ids(model, ids, 32, 16)["perplexity"])
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)  # "training" changes the model
    try:
        after = forgetting_report(model, tok, path, max_tokens=100, window=32, stride=16)
    finally:
        with torch.no_grad():
            model.model.norm.weight.div_(1.5)
    delta = compare_forgetting(before, after)
    assert delta["relative_change"] == pytest.approx(after["perplexity"] / before["perplexity"] - 1)
    assert delta["relative_change"] != 0
    with pytest.raises(ValueError, match="measured differently"):
        compare_forgetting(before, {**after, "window": 64})
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        forgetting_report(model, tok, tmp_path / "nope.txt")


@pytest.mark.integration
@pytest.mark.skipif(not WIKITEXT.exists(), reason=f"real data not found at {WIKITEXT}")
def test_smollm2_perplexity_on_wikitext():
    from peftlab.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    # ~2k tokens in 4 non-overlapping windows keeps this CPU test short
    report = forgetting_report(model, tok, WIKITEXT, max_tokens=2048, window=512, stride=512)
    assert report["tokens"] == 2048 - 4 and report["windows"] == 4
    assert 10 < report["perplexity"] < 60, report  # SmolLM2-135M on WikiText-2: ~30
    # one window against transformers' own loss
    ids = torch.tensor(corpus_prefix_ids(WIKITEXT, tok, 256))
    with torch.no_grad():
        hf = model(input_ids=ids[None], labels=ids[None]).loss
    assert_close(perplexity_of_ids(model, ids, window=256, stride=256)["nll"], float(hf),
                 rtol=1e-4, atol=0)
