"""Cheap CPU dropout: the mask's distribution, exact forward/backward against a hand
computation with the same mask, and the context manager leaving the model as it found it
(attention dropout: tests/test_cpu_attention.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from peftlab.runtime.fast_dropout import (
    FastDropout,
    apply_dropout,
    fast_dropout,
    keep_mask,
    kept_fraction,
    random_words,
)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_is_bernoulli_and_seeded(p):
    torch.manual_seed(0)
    mask = keep_mask((300, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (300, 1000)
    n, keep = mask.numel(), kept_fraction(p)
    sigma = (keep * (1 - keep) / n) ** 0.5
    assert abs(mask.float().mean().item() - keep) < 5 * sigma
    # lanes are independent: neighbours agree as often as chance says
    both = (mask[:, :-1] & mask[:, 1:]).float().mean().item()
    assert abs(both - keep * keep) < 0.01
    torch.manual_seed(0)
    assert torch.equal(keep_mask((300, 1000), p), mask)
    assert abs(kept_fraction(p) - (1 - p)) <= 1 / 65536
    assert keep_mask((7,), 0.0).all()  # odd sizes; p = 0 keeps all


def _splitmix64(counter: int, seed: int) -> int:
    """SplitMix64's output function in Python's unbounded integers, masked to 64 bits."""
    z = (counter * 0x9E3779B97F4A7C15 + seed) % 2 ** 64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2 ** 64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2 ** 64
    return z ^ (z >> 31)


def test_random_words_are_splitmix64_of_a_seed_from_torchs_generator():
    torch.manual_seed(3)
    seed = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (1,))) % 2 ** 64
    torch.manual_seed(3)
    words = random_words(257)
    assert words.dtype == torch.int64
    assert [int(w) % 2 ** 64 for w in words] == [_splitmix64(i, seed) for i in range(257)]
    assert not torch.equal(random_words(257), words)  # the generator moved on


def test_dropout_forward_and_backward_match_the_same_mask():
    x = torch.randn(4, 5, 6, requires_grad=True)
    torch.manual_seed(3)
    out = apply_dropout(x, 0.25)
    torch.manual_seed(3)
    mask = keep_mask(x.shape, 0.25)
    expected = x.detach() * mask / kept_fraction(0.25)
    assert_close(out, expected)
    out.backward(torch.ones_like(out))
    assert_close(x.grad, mask / kept_fraction(0.25))
    assert apply_dropout(x, 0.25, training=False) is x and apply_dropout(x, 0.0) is x
    assert torch.equal(apply_dropout(x, 1.0), torch.zeros_like(x))
    layer = FastDropout(0.25).eval()
    assert layer(x) is x and "p=0.25" in repr(layer)


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg)


def test_context_switches_every_dropout_and_restores_the_model():
    model = _tiny_bert()
    ids = torch.randint(0, 50, (3, 7))
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[2, 4:] = 0
    before = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    model.eval()
    reference = model(input_ids=ids, attention_mask=attention).logits
    with fast_dropout(model) as switched:
        # embeddings, 3 per layer (the attention's holds the p SDPA gets), the classifier's
        assert switched == 1 + 3 * 2 + 1
        assert not any(type(m) is nn.Dropout for m in model.modules())
        assert list(model.state_dict()) == keys
        assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, reference)
        model.train()
        torch.manual_seed(1)
        a = model(input_ids=ids, attention_mask=attention).logits
        torch.manual_seed(1)
        b = model(input_ids=ids, attention_mask=attention).logits
        a.sum().backward()
    assert torch.equal(a, b) and not torch.allclose(a, reference)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert [type(m) for m in model.modules()] == before
    assert model.training  # mode kept
    with fast_dropout(model, enabled=False) as switched:
        assert switched == 0 and any(type(m) is nn.Dropout for m in model.modules())


def test_a_model_without_dropout_is_left_alone():
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.0,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    with fast_dropout(model) as switched:
        assert switched == 0
