"""CPU attention: the grouped path against a hand computation and against transformers' SDPA
(outputs and gradients), the per-shape choice timed once per signature, the dispatch rules,
and the context manager on real tiny models (same logits, config restored)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peftlab.runtime import cpu_attention as attention_module
from peftlab.runtime.cpu_attention import (
    ATTENTION_NAME,
    MAX_GROUPED_LEN,
    attention_forward,
    cpu_attention,
    grouped_attention,
    grouped_is_faster,
    measured_choices,
)
from peftlab.runtime.fast_dropout import keep_mask, kept_fraction


class _Attention(nn.Module):
    def __init__(self, groups: int, causal: bool):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def _reference(q, k, v, bias, mask, keep):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    return ((scores.softmax(-1) * mask / keep) @ v).transpose(1, 2)


def _case(case: str, b=2, h=4, s=5, d=8):
    torch.manual_seed(0)
    groups = 2 if case in ("gqa", "per-head") else 1
    q = torch.randn(b, h, s, d)
    k, v = torch.randn(b, h // groups, s, d), torch.randn(b, h // groups, s, d)
    pad = torch.ones(b, 1, s, s, dtype=torch.bool)
    pad[1, :, :, -2:] = False  # the second row's last two keys are padding
    lowest = torch.finfo(torch.float32).min
    attention_mask, bias = None, torch.zeros(b, 1, s, s)
    if case in ("bool", "gqa"):
        attention_mask, bias = pad, torch.where(pad, 0.0, lowest)
    elif case == "per-head":  # a mask with one slice per query head
        heads = pad.expand(b, h, s, s).clone()
        heads[0, 3, :, 0] = False
        attention_mask, bias = heads, torch.where(heads, 0.0, lowest)
    elif case == "additive":
        attention_mask = bias = torch.where(pad, 0.0, -1e4)
    else:
        bias = torch.full((s, s), lowest).triu(1)
    module = _Attention(groups, causal=case == "causal")
    return module, q, k, v, attention_mask, bias, groups


CASES = ["bool", "additive", "causal", "gqa", "per-head"]


@pytest.mark.parametrize("case", CASES)
def test_grouped_attention_with_dropout_is_softmax_mask_matmul(case):
    module, q, k, v, attention_mask, bias, groups = _case(case)
    torch.manual_seed(7)
    out, weights = attention_forward(module, q, k, v, attention_mask, dropout=0.3)
    torch.manual_seed(7)
    mask = keep_mask((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), 0.3)
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    assert weights is None and out.shape == (2, 5, 4, 8)
    assert_close(out, _reference(q, kk, vv, bias, mask, kept_fraction(0.3)))


@pytest.mark.parametrize("case", CASES)
def test_grouped_attention_matches_sdpa_outputs_and_gradients(case):
    module, q, k, v, attention_mask, _, _ = _case(case)
    causal = module.is_causal and attention_mask is None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ours = grouped_attention(*leaves, attention_mask, causal=causal)
    ours.pow(2).sum().backward()
    theirs_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs, _ = sdpa_attention_forward(module, *theirs_leaves, attention_mask)
    theirs.pow(2).sum().backward()
    assert_close(ours, theirs)
    for a, b in zip(leaves, theirs_leaves, strict=True):
        assert_close(a.grad, b.grad)


def test_a_query_with_no_key_to_attend_gets_zeros_as_from_sdpa():
    # the plain softmax would give NaN for that row; the safe one (used only then) zeros
    module, q, k, v, attention_mask, _, _ = _case("bool")
    attention_mask = attention_mask.clone()
    attention_mask[0, :, 2, :] = False  # the first row's third query sees no key
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ours = grouped_attention(*leaves, attention_mask)
    ours.pow(2).sum().backward()
    theirs_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs, _ = sdpa_attention_forward(module, *theirs_leaves, attention_mask)
    theirs.pow(2).sum().backward()
    assert torch.equal(ours[0, 2], torch.zeros_like(ours[0, 2]))
    assert_close(ours, theirs)
    for a, b in zip(leaves, theirs_leaves, strict=True):
        assert_close(a.grad, b.grad)


def test_grouped_attention_in_bf16_stays_close_to_fp32():
    module, q, k, v, _, _, _ = _case("gqa", b=2, h=6, s=64, d=16)
    exact = grouped_attention(q, k, v, causal=True)
    low = grouped_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert low.dtype == torch.bfloat16
    assert_close(low.float(), exact, atol=0.03, rtol=0.03)


def test_the_choice_is_timed_once_per_signature(monkeypatch):
    calls = []

    def fake_timing(dtype, heads, kv_heads, dim, length, repeats):
        calls.append(length)
        return length <= 256

    monkeypatch.setattr(attention_module, "_CHOICES", {})
    monkeypatch.setattr(attention_module, "_time_grouped_vs_sdpa", fake_timing)
    q, k = torch.zeros(1, 4, 200, 8), torch.zeros(1, 2, 200, 8)
    assert grouped_is_faster(q, k)
    assert grouped_is_faster(q[:, :, :256], k[:, :, :256])  # same bucket
    with torch.no_grad():  # the same choice without grad (checkpointed forwards)
        assert grouped_is_faster(q, k)
    assert calls == [256]
    assert not grouped_is_faster(torch.zeros(1, 4, 257, 8), torch.zeros(1, 2, 257, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # timed in the dtype autocast runs
        grouped_is_faster(q, k)
    assert calls == [256, 512, 256]
    assert measured_choices() == {"fp32 h4/2 d8 len256": "grouped",
                                  "fp32 h4/2 d8 len512": "sdpa",
                                  "bf16 h4/2 d8 len256": "grouped"}


def test_the_real_timing_returns_a_choice(monkeypatch):
    monkeypatch.setattr(attention_module, "_CHOICES", {})
    q, k = torch.zeros(1, 4, 16, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 16, 8)
    assert grouped_is_faster(q, k, repeats=1) in (True, False)
    assert list(measured_choices()) == ["bf16 h4/2 d8 len16"]


@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_follows_the_measured_choice(monkeypatch, grouped):
    monkeypatch.setattr(attention_module, "grouped_is_faster", lambda *a, **k: grouped)
    used = []
    real = attention_module.grouped_attention
    monkeypatch.setattr(attention_module, "grouped_attention",
                        lambda *a, **k: used.append(1) or real(*a, **k))
    module, q, k, v, attention_mask, _, _ = _case("gqa")
    out, _ = attention_forward(module, q, k, v, attention_mask)
    expected, _ = sdpa_attention_forward(module, q, k, v, attention_mask)
    assert_close(out, expected)
    assert bool(used) == grouped


def test_cached_keys_and_long_sequences_go_to_sdpa(monkeypatch):
    monkeypatch.setattr(attention_module, "grouped_is_faster", lambda *a, **k: True)
    monkeypatch.setattr(attention_module, "grouped_attention",
                        lambda *a, **k: pytest.fail("grouped path taken"))
    module = _Attention(1, causal=True)
    q, kv = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8)  # one new token, a KV cache
    attention_forward(module, q, kv, kv, None)
    long = torch.randn(1, 1, MAX_GROUPED_LEN + 1, 4)
    attention_forward(module, long, long, long, None)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("padded", [False, True])
def test_context_keeps_llama_logits_and_gradients(monkeypatch, padded):
    monkeypatch.setattr(attention_module, "grouped_is_faster", lambda *a, **k: True)
    model = _tiny_llama()
    ids = torch.randint(0, 40, (2, 9))
    attention = torch.ones(2, 9, dtype=torch.long)
    if padded:
        attention[1, :3] = 0  # left padding
    reference = model(input_ids=ids, attention_mask=attention, labels=ids)
    reference.loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with cpu_attention(model) as switched:
        assert switched == 1 and model.config._attn_implementation == ATTENTION_NAME
        out = model(input_ids=ids, attention_mask=attention, labels=ids)
        out.loss.backward()
    assert model.config._attn_implementation == "sdpa"
    assert_close(out.logits, reference.logits)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert_close(p.grad, g)
    with cpu_attention(model, enabled=False) as switched:
        assert switched == 0 and model.config._attn_implementation == "sdpa"


def test_context_gives_bert_seeded_attention_dropout():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                     attn_implementation="sdpa")
    model = BertForSequenceClassification(cfg)
    ids = torch.randint(0, 50, (3, 7))
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[2, 4:] = 0
    model.eval()
    reference = model(input_ids=ids, attention_mask=attention).logits
    with cpu_attention(model):
        assert_close(model(input_ids=ids, attention_mask=attention).logits, reference)
        model.train()
        torch.manual_seed(1)
        a = model(input_ids=ids, attention_mask=attention).logits
        torch.manual_seed(1)
        b = model(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(a, b) and not torch.allclose(a, reference)


def test_timing_leaves_the_global_random_stream_alone(monkeypatch):
    monkeypatch.setattr(attention_module, "_CHOICES", {})
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    grouped_is_faster(torch.zeros(1, 2, 8, 4), torch.zeros(1, 1, 8, 4), repeats=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_meets_a_new_shape_inside_the_checkpoint(monkeypatch,
                                                                          reentrant):
    """The first forward that meets a shape times both kernels from inside the checkpointed
    block; the recomputation must save what the forward saved, and the gradients hold."""
    model = _tiny_llama()
    ids = torch.randint(0, 40, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={
        "use_reentrant": reentrant})
    model.train()
    monkeypatch.setattr(attention_module, "_CHOICES", {})
    with cpu_attention(model):
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(measured_choices()) == 1
    for p, g in zip(model.parameters(), expected, strict=True):
        assert_close(p.grad, g)


def test_restore_choices_skips_what_does_not_read(monkeypatch):
    monkeypatch.setattr(attention_module, "_CHOICES", {})
    attention_module.restore_choices([["bfloat16", 9, 3, 64, 256, True], ["nonsense", 1],
                                      ["no_dtype", 1, 1, 1, 1, True], "x",
                                      ["Tensor", 1, 1, 1, 1, True]])
    assert attention_module.choices_state() == [["bfloat16", 9, 3, 64, 256, True]]
    attention_module.restore_choices({"not": "a list"})
    assert len(attention_module.choices_state()) == 1


@pytest.mark.parametrize("faster", [True, False])
def test_compiled_blocks_take_the_kernel_timed_before_they_run(monkeypatch, faster):
    """With compiled blocks the choice is timed in the eager owner's pre-hook (the batch's
    length bucket), read as a constant by the traced code, which must not break its graph on
    the padding check; logits and gradients stay those of the model's own SDPA."""
    from torch._dynamo.utils import counters

    from peftlab.training.compile import compiled_blocks

    timed: list[tuple] = []
    monkeypatch.setattr(attention_module, "_CHOICES", {})
    monkeypatch.setattr(attention_module, "_time_grouped_vs_sdpa",
                        lambda *signature: timed.append(signature[:5]) or faster)
    traced: list[int] = []
    original = attention_module.grouped_attention
    monkeypatch.setattr(attention_module, "grouped_attention",
                        lambda *a, **k: traced.append(1) or original(*a, **k))
    model = _tiny_llama()
    ids = torch.randint(0, 40, (2, 9))
    attention = torch.ones(2, 9, dtype=torch.long)
    attention[1, :3] = 0  # left padding: the traced code must take the safe softmax
    reference = model(input_ids=ids, attention_mask=attention, labels=ids)
    reference.loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    with cpu_attention(model, compiled=True), compiled_blocks(model, True):
        out = model(input_ids=ids, attention_mask=attention, labels=ids)
        out.loss.backward()
    torch._dynamo.reset()
    assert timed == [(torch.float32, 4, 2, 8, 16)]  # once, for the 9-token batch's bucket
    assert bool(traced) == faster
    assert not counters["graph_break"]
    assert attention_module._TRACED_CHOICE == {}  # cleared on leaving
    assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-4)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_compiled_blocks_with_attention_dropout_keep_sdpa(monkeypatch):
    """Traced code with a dropout probability takes SDPA (inductor traces its random numbers;
    ours come from a generator outside the graph), whatever the timing said."""
    from torch._dynamo.utils import counters

    from peftlab.training.compile import compiled_blocks

    monkeypatch.setattr(attention_module, "_CHOICES", {})
    monkeypatch.setattr(attention_module, "_time_grouped_vs_sdpa", lambda *signature: True)
    traced: list[int] = []
    original = attention_module.grouped_attention
    monkeypatch.setattr(attention_module, "grouped_attention",
                        lambda *a, **k: traced.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
        attn_implementation="sdpa"))
    model.train()
    ids = torch.randint(0, 40, (2, 9))
    torch._dynamo.reset()
    counters.clear()
    with cpu_attention(model, compiled=True), compiled_blocks(model, True):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    torch._dynamo.reset()
    assert torch.isfinite(loss) and not traced and not counters["graph_break"]
