"""runtime/fast_rms_norm.py: the swapped RMSNorm computes what the model's does, forward and
backward, and is swapped only where it provably agrees."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peftlab.runtime.fast_rms_norm import FastRMSNorm, _RMSNorm, fast_rms_norm
from peftlab.training.trainer import cpu_training_kernels

WIDTH = 48


def _norm(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(WIDTH, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(WIDTH, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return norm.to(dtype)


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    module.weight.grad = None
    out = module(x)
    out.backward(grad)
    w_grad = None if module.weight.grad is None else module.weight.grad.clone()
    return out.detach(), x.grad, w_grad


@pytest.mark.parametrize("weight_trains", [False, True])
def test_forward_and_gradients_equal_the_models_norm(weight_trains):
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(3, 7, WIDTH, generator=g) * 3, torch.randn(3, 7, WIDTH, generator=g)
    norm = _norm()
    norm.weight.requires_grad_(weight_trains)
    expected = _forward_backward(norm, x, grad)
    got = _forward_backward(FastRMSNorm(norm), x, grad)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    if weight_trains:
        torch.testing.assert_close(got[2], expected[2])
    else:
        assert got[2] is None and expected[2] is None


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(5, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))


def test_bf16_activations_take_the_models_formula():
    norm = _norm(dtype=torch.bfloat16)
    x = torch.randn(4, WIDTH).to(torch.bfloat16)
    assert torch.equal(FastRMSNorm(norm)(x), norm(x))


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=WIDTH, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def test_a_model_trains_identically_inside_the_block():
    model = _tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name or "up_proj" in name)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    keys = list(model.state_dict())

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad}

    expected = loss_and_grads()
    with fast_rms_norm(model) as swapped:
        assert swapped == 2 * 2 + 1  # two per layer and the final norm
        assert isinstance(model.model.norm, FastRMSNorm)
        assert list(model.state_dict()) == keys  # checkpoints written inside see no change
        got = loss_and_grads()
    assert type(model.model.norm) is LlamaRMSNorm
    assert all(not isinstance(m, FastRMSNorm) for m in model.modules())
    torch.testing.assert_close(got[0], expected[0])
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, msg=name)


class OffsetRMSNorm(nn.Module):
    """Gemma's form: ``(1 + weight)``. Same attributes as Llama's, another result."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * h


def test_declines_other_forms_hooks_and_compiled_training():
    model = nn.Sequential(OffsetRMSNorm(WIDTH), _norm(), _norm(1))
    model[2].register_forward_hook(lambda *_: None)
    with fast_rms_norm(model) as swapped:
        assert swapped == 1
        assert [type(m).__name__ for m in model] == ["OffsetRMSNorm", "FastRMSNorm",
                                                      "LlamaRMSNorm"]
    with fast_rms_norm(model, enabled=False) as swapped:
        assert swapped == 0
    with cpu_training_kernels(model, compiled=True):
        assert type(model[1]) is LlamaRMSNorm  # inductor fuses the norm in compiled blocks
    with cpu_training_kernels(model):
        assert type(model[1]) is FastRMSNorm
    assert type(model[1]) is LlamaRMSNorm
