"""The fused LoRA autograd Function against the module-by-module path on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

from peftlab.methods.lora import LoraConfig, LoraLinear

IN, OUT, R = 24, 20, 4


def make_layer(bias: bool = True, conv1d: bool = False, dropout: float = 0.0,
               dtype: torch.dtype = torch.float32) -> LoraLinear:
    torch.manual_seed(0)
    base = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT, bias=bias)
    if conv1d:
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    base.requires_grad_(False)
    layer = LoraLinear(base.to(dtype))
    layer.add_adapter("default", LoraConfig(r=R, alpha=8, dropout=dropout, init="random"))
    layer.active_adapter = "default"
    return layer


def run(layer: LoraLinear, x: torch.Tensor, fused: bool, seed: int = 0):
    """Output and gradients of x, A and B for a fixed random upstream gradient."""
    layer.fused = fused
    x = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.grad = b.grad = None
    torch.manual_seed(seed)  # the same dropout mask on both paths
    out = layer(x)
    assert ("FusedLora" in type(out.grad_fn).__name__) == fused
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad_out)
    return out.detach(), x.grad, a.grad.clone(), b.grad.clone()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, IN), (2, 5, IN)], ids=["2d", "3d"])
def test_fused_matches_unfused_fp32(bias, shape):
    layer = make_layer(bias=bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    expected = run(layer, x, fused=False)
    got = run(layer, x, fused=True)
    for name, e, g in zip(("out", "grad_x", "grad_A", "grad_B"), expected, got, strict=True):
        assert_close(g, e, msg=name)
    # and against the formula, so both paths can't be wrong together
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    ref = x @ w.T + scale * (x @ a.T) @ b.T + (layer.base_layer.bias if bias else 0)
    assert_close(got[0], ref)


def test_conv1d_base_and_training_dropout():
    layer = make_layer(conv1d=True, dropout=0.3).train()
    x = torch.randn(2, 6, IN, generator=torch.Generator().manual_seed(3))
    expected = run(layer, x, fused=False)
    got = run(layer, x, fused=True)
    for name, e, g in zip(("out", "grad_x", "grad_A", "grad_B"), expected, got, strict=True):
        assert_close(g, e, msg=name)


def test_input_without_grad_still_trains_a_and_b():
    layer = make_layer()
    x = torch.randn(3, 4, IN, generator=torch.Generator().manual_seed(4))
    grads = []
    for fused in (False, True):
        layer.fused = fused
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.grad = b.grad = None
        layer(x).square().sum().backward()
        grads.append((a.grad.clone(), b.grad.clone()))
    assert_close(grads[1], grads[0])


def test_bf16_autocast_with_bf16_base_and_fp32_lora():
    """Both paths under bf16 autocast land as close to the fp32 computation (bf16 rounding)."""
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(5))
    results = []
    for fused, autocast in ((False, False), (False, True), (True, True)):
        layer.fused = fused
        layer.base_layer.to(torch.bfloat16 if autocast else torch.float32)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.grad = b.grad = None
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(xg)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        out.float().square().sum().backward()
        assert a.grad.dtype == torch.float32 and xg.grad.dtype == torch.float32
        results.append((out.float(), xg.grad, a.grad.clone(), b.grad.clone()))
    reference, unfused, fused = results
    for name, r, u, f in zip(("out", "grad_x", "grad_A", "grad_B"), reference, unfused, fused,
                             strict=True):
        assert ((u - r).norm() / r.norm()) < 0.02, name
        assert ((f - r).norm() / r.norm()) < 0.02, name


def _captured(got: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> float:
    """The share of ``delta`` that ``got - base`` carries (1.0: all of it)."""
    with torch.no_grad():
        d = got.float() - base
        return float((d * delta).sum() / (delta * delta).sum())


def test_bf16_keeps_an_update_smaller_than_the_base_outputs_rounding():
    """A freshly trained B (~1e-4) changes a bf16 projection by less than half an ulp of its
    output. Rounded once, from the GEMM's accumulator, the update survives on average; with
    the base output rounded first it was lost (~24% of it arrived)."""
    torch.manual_seed(0)
    n_in, n_out, r, tokens, scaling = 64, 64, 4, 512, 2.0
    base = nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16).requires_grad_(False)
    nn.init.normal_(base.weight, std=n_in ** -0.5)
    layer = LoraLinear(base)
    layer.add_adapter("default", LoraConfig(r=r, alpha=r * scaling, init="random"))
    layer.active_adapter = "default"
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.normal_(std=n_in ** -0.5).copy_(a.bfloat16())
        b.normal_(std=1e-4).copy_(b.bfloat16())
    x = torch.randn(tokens, n_in).bfloat16()
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and layer._fused_dtype(x) == torch.bfloat16
    w, xf = base.weight.float(), x.float()
    xa = (xf @ a.T).bfloat16().float()  # the kernel's rank-r activation is bf16 too
    assert 0.9 < _captured(out, xf @ w.T, scaling * xa @ b.T) < 1.1


def test_trainable_base_weight_takes_plain_path():
    layer = make_layer()
    layer.base_layer.weight.requires_grad_(True)
    out = layer(torch.randn(3, IN))
    assert "FusedLora" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert layer.base_layer.weight.grad is not None


def test_disabled_and_merged_layers_skip_the_adapter():
    layer = make_layer()
    x = torch.randn(3, IN)
    base = layer.base_layer(x)
    adapted = layer(x)
    layer.disabled = True
    assert_close(layer(x), base)
    layer.disabled = False
    layer.merge()
    assert_close(layer(x), adapted, atol=1e-5, rtol=1e-5)


def test_compiled_layer_updates_the_projection_in_place():
    """Traced, ``out.addmm_`` became a copy of the whole projection output plus an addmm; the
    library op is re-placed by inductor (no clone), forward and backward, same numbers."""
    from torch._inductor.utils import run_and_get_code

    layer = make_layer(bias=False)
    x = torch.randn(2, 5, IN)
    expected = run(layer, x, fused=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.grad = b.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(layer)

    def step():
        leaf = x.clone().requires_grad_(True)
        out = compiled(leaf)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return out.detach(), leaf.grad

    (out, grad_x), codes = run_and_get_code(step)
    torch._dynamo.reset()
    for got, want in zip((out, grad_x, a.grad, b.grad), expected, strict=True):
        assert_close(got, want)
    assert len(codes) == 2  # forward and backward graphs
    for code in codes:
        assert "torch.ops.peftlab.addmm_in_place.default(buf" in code
        assert "clone" not in code and "auto_functionalized" not in code
