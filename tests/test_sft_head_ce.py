"""The memory-bounded chunked cross-entropy of SFTTask against plain F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.methods.lora import LoraConfig, apply_lora
from peftlab.models.lm import CHUNK_LOGITS_BYTES, fused_chunk_rows, head_cross_entropy
from peftlab.tasks.sft.task import IGNORE, SFTTask

HIDDEN, VOCAB = 16, 50


def frozen_head(bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(HIDDEN, VOCAB, bias=bias).requires_grad_(False)


def reference(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, scale: float):
    h = hidden.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(head(h).float(), targets, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n, chunk", [(10, 64), (12, 4), (10, 4), (1, 1), (40, 8)],
                         ids=["one-chunk", "exact-boundary", "remainder", "single-row",
                              "more-rows-than-hidden"])  # rows > HIDDEN: no axis mix-up
def test_matches_full_logits_cross_entropy(n, chunk, bias):
    head = frozen_head(bias)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, HIDDEN, generator=gen)
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    expected_loss, expected_grad = reference(hidden, head, targets, scale=1 / 7)

    h = hidden.clone().requires_grad_(True)
    loss = head_cross_entropy(h, head, targets, chunk)
    assert "FrozenHeadCrossEntropy" in type(loss.grad_fn).__name__
    (loss * (1 / 7)).backward()  # the trainer divides by the token count: grad_output != 1
    assert_close(loss.detach(), expected_loss)
    assert_close(h.grad, expected_grad)


def test_a_large_vocabulary_is_split_so_no_chunk_of_fp32_logits_passes_30_mib(monkeypatch):
    """SmolLM2's 49,152 words: 160-row chunks (4,096 rows would be 800 MB, mapped fresh from
    the kernel and page-faulted on every use); a chunk_size below that is kept."""
    assert fused_chunk_rows(49_152, 4096) == 160
    assert fused_chunk_rows(49_152, 100) == 100
    assert fused_chunk_rows(50, 4096) == 4096
    assert fused_chunk_rows(1_000_000, 4096) == 32  # never thinner than 32 rows
    vocab, n = 60_000, 300
    seen: list[torch.Size] = []
    linear = F.linear

    def spy(x, w, b=None):
        out = linear(x, w, b)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(F, "linear", spy)
    torch.manual_seed(0)
    head = nn.Linear(8, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(n, 8, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    loss = head_cross_entropy(hidden, head, targets, 4096)
    loss.backward()
    assert len(seen) == 3 and all(r * vocab * 4 <= CHUNK_LOGITS_BYTES for r, _ in seen)
    monkeypatch.undo()
    expected_loss, expected_grad = reference(hidden, head, targets, scale=1.0)
    assert_close(loss.detach(), expected_loss)
    assert_close(hidden.grad, expected_grad)


def test_trained_head_keeps_the_autograd_path():
    head = frozen_head().requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, HIDDEN, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (9,), generator=gen)
    loss = head_cross_entropy(hidden, head, targets, 4)
    assert "FrozenHeadCrossEntropy" not in type(loss.grad_fn).__name__
    loss.backward()
    assert head.weight.grad is not None
    assert_close(loss.detach(), F.cross_entropy(head(hidden), targets, reduction="sum").detach())


def test_bf16_autocast_close_to_fp32():
    head = frozen_head()
    head.weight.data = head.weight.data.bfloat16().float()  # the same weights in both runs
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, HIDDEN, generator=gen)
    targets = torch.randint(0, VOCAB, (11,), generator=gen)
    expected_loss, expected_grad = reference(hidden, head, targets, scale=1.0)
    head.bfloat16()
    h = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_cross_entropy(h, head, targets, 4)
    assert "FrozenHeadCrossEntropy" in type(loss.grad_fn).__name__
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert_close(loss.detach(), expected_loss, rtol=0.01, atol=0)
    assert ((h.grad - expected_grad).norm() / expected_grad.norm()) < 0.02


def test_sft_loss_with_lora_matches_full_model_logits():
    """End to end: tied, frozen embeddings as the head; LoRA gradients equal the plain CE's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    apply_lora(model, LoraConfig(r=4, init="random"))
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (2, 9), generator=gen)
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a prompt
    labels[1, 6:] = IGNORE  # padding
    mask = (labels[1] != IGNORE).long().expand(2, -1).clone()
    mask[0] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]

    loss, n = SFTTask(pad_id=0, chunk_size=3).loss(model, batch)
    (loss / n).backward()
    ours = [p.grad.clone() for p in params]
    model.zero_grad()

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != IGNORE
    expected = F.cross_entropy(logits[keep].float(), labels[:, 1:][keep], reduction="sum")
    (expected / n).backward()
    assert n == int(keep.sum())
    assert_close(loss.detach(), expected.detach())
    for p, g in zip(params, ours, strict=True):
        assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_target_too_unlikely_for_the_softmax_gets_its_exact_loss(dtype):
    """Target probabilities below the dtype's smallest normal (a loss of ~90+ nats, e.g. a
    diverging run) come out of the softmax as 0 or a subnormal: their loss is recomputed from
    the logits, not reported as inf or capped."""
    head = frozen_head()
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, HIDDEN, generator=gen)
    targets = torch.randint(0, VOCAB, (6,), generator=gen)
    with torch.no_grad():  # word 7's logit 120-200 below the rest for every row
        head.weight[7] = -hidden.new_tensor(range(HIDDEN)) * 4.0
        hidden[:, :] = hidden.abs() + 1.0
    targets[1] = targets[4] = 7
    head.to(dtype)
    h = hidden.to(dtype).requires_grad_(True)
    loss = head_cross_entropy(h, head, targets, 4)
    logits = F.linear(h.detach(), head.weight).float()
    expected = F.cross_entropy(logits, targets, reduction="sum")
    assert torch.softmax(logits, -1)[[1, 4], 7].max() < torch.finfo(dtype).tiny
    assert torch.isfinite(loss) and float(expected) > 2 * 90
    assert_close(loss.detach(), expected, rtol=1e-3, atol=0)


def test_bf16_loss_is_within_the_rounding_of_the_target_probability():
    """Inputs in bf16 (autocast off, as under precision: bf16): the softmax runs in bf16, so
    each token's loss may be off by -log(1 +- 2^-9) <= 0.002 nats from the fp32 CE of the same
    bf16 logits; the input gradient is the same softmax - onehot, rounded to bf16."""
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, 4_000, bias=False).requires_grad_(False).bfloat16()
    gen = torch.Generator().manual_seed(6)
    hidden = (torch.randn(64, HIDDEN, generator=gen) * 3).bfloat16()
    targets = torch.randint(0, 4_000, (64,), generator=gen)
    h = hidden.clone().requires_grad_(True)
    loss = head_cross_entropy(h, head, targets, 16)
    loss.backward()
    ref = hidden.float().requires_grad_(True)
    logits = F.linear(ref.bfloat16(), head.weight).float()  # the same bf16 logits
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) <= 64 * 2 ** -9
    assert ((h.grad.float() - ref.grad).norm() / ref.grad.norm()) < 0.01
