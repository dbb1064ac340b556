"""packed_linears: frozen linear layers run with oneDNN-packed weights while decoding on a CPU."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from peftlab.runtime.packed_linear import PackedLinear, packed_linears, packing_available, packs

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


def test_packs_fp32_everywhere_and_bf16_only_where_the_cpu_has_the_instructions():
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    bf16_isa = {"avx512bw", "avx512vl", "avx512dq"} <= set(flags) or "avx_ne_convert" in flags
    assert packs(torch.float32)
    if sys.platform == "linux":
        assert packs(torch.bfloat16) == bf16_isa
    assert not packs(torch.float16)  # not a decoding dtype we pack


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 96), nn.GELU(), nn.Linear(96, 24, bias=False)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 40), (3, 40), (2, 5, 40)], ids=["1-row", "3-rows", "3d"])
def test_same_outputs_as_nn_linear_and_the_model_comes_back(dtype, shape):
    model = _model(dtype)
    x = torch.randn(*shape).to(dtype)
    expected = model(x)
    originals = [model[0], model[2]]
    keys = list(model.state_dict())
    with torch.no_grad(), packed_linears(model) as n:
        if packs(dtype):
            assert n == 2 and all(isinstance(model[i], PackedLinear) for i in (0, 2))
        else:  # this CPU's oneDNN refuses the dtype: the layers stay as they are
            assert n == 0 and [model[0], model[2]] == originals
        assert model[0].weight is originals[0].weight  # the same parameters, tied stay tied
        assert list(model.state_dict()) == keys
        got = model(x)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected.detach())  # bit-identical products
    else:
        assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    assert [model[0], model[2]] == originals


def test_a_gradient_still_flows_where_one_is_asked_for():
    model = _model(torch.float32)
    x = torch.randn(4, 40, requires_grad=True)
    model(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    with packed_linears(model):
        model(x).sum().backward()  # falls back to F.linear: autograd as usual
    assert_close(x.grad, expected)


def test_weights_changed_before_the_block_are_the_ones_packed():
    model = _model(torch.float32)  # fp32: every oneDNN packs it
    with torch.no_grad():
        model[0].weight.mul_(2)
        x = torch.randn(2, 40)
        expected = model(x)
        with packed_linears(model) as n:
            assert n == 2
            assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_disabled_or_hooked_or_other_types_are_left_alone():
    model = _model(torch.float32)  # fp32: every oneDNN packs it
    with packed_linears(model, enabled=False) as n:
        assert n == 0 and type(model[0]) is nn.Linear
    model[0].register_forward_hook(lambda *a: None)
    with packed_linears(model) as n:
        assert n == 1 and type(model[0]) is nn.Linear and isinstance(model[2], PackedLinear)
