"""Cheap CPU dropout: the mask's distribution, exact forward/backward against a hand
computation with the same mask, the attention path against transformers' SDPA, and the
context manager leaving the model as it found it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peftlab.runtime.fast_dropout import (
    ATTENTION_NAME,
    FastDropout,
    apply_dropout,
    fast_dropout,
    keep_mask,
    kept_fraction,
    sdpa_fast_dropout,
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


class _Attention(nn.Module):
    def __init__(self, groups: int = 1, causal: bool = False):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def _reference(q, k, v, bias, mask, keep):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    return ((scores.softmax(-1) * mask / keep) @ v).transpose(1, 2)


@pytest.mark.parametrize("case", ["bool", "additive", "causal", "gqa"])
def test_attention_with_dropout_is_softmax_mask_matmul(case):
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 5, 8
    groups = 2 if case == "gqa" else 1
    q = torch.randn(b, h, s, d)
    k, v = torch.randn(b, h // groups, s, d), torch.randn(b, h // groups, s, d)
    pad = torch.ones(b, 1, s, s, dtype=torch.bool)
    pad[1, :, :, -2:] = False  # the second row's last two keys are padding
    bias = torch.zeros(b, 1, s, s)
    attention_mask = None
    if case in ("bool", "gqa"):
        attention_mask, bias = pad, torch.where(pad, 0.0, torch.finfo(torch.float32).min)
    elif case == "additive":
        attention_mask = bias = torch.where(pad, 0.0, -1e4)
    else:
        bias = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)
    module = _Attention(groups, causal=case == "causal")
    torch.manual_seed(7)
    out, weights = sdpa_fast_dropout(module, q, k, v, attention_mask, dropout=0.3)
    torch.manual_seed(7)
    mask = keep_mask((b, h, s, s), 0.3)
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    assert weights is None
    assert_close(out, _reference(q, kk, vv, bias, mask, kept_fraction(0.3)))
    # without dropout it is transformers' own SDPA call
    plain, _ = sdpa_fast_dropout(module, q, k, v, attention_mask, dropout=0.0)
    expected, _ = sdpa_attention_forward(module, q, k, v, attention_mask, dropout=0.0)
    assert torch.equal(plain, expected)
    assert_close(plain, _reference(q, kk, vv, bias, torch.ones(1, dtype=torch.bool), 1.0))


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
        # embeddings, 3 per layer (the attention's holds the p SDPA gets), the classifier's;
        # and the attention implementation (one config)
        assert switched == 1 + 3 * 2 + 1 + 1
        assert model.config._attn_implementation == ATTENTION_NAME
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
    assert model.config._attn_implementation == "sdpa" and model.training  # mode kept
    with fast_dropout(model, enabled=False) as switched:
        assert switched == 0 and model.config._attn_implementation == "sdpa"


def test_a_model_without_dropout_is_left_alone():
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.0,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    with fast_dropout(model) as switched:
        assert switched == 0 and model.config._attn_implementation == "sdpa"
