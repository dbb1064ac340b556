"""RMSNorm for eager training on a CPU in fewer passes over the activations.

Why: Llama-family models write RMSNorm as ``weight * (x * rsqrt(mean(x^2) + eps))`` in
separate ops, and autograd replays each: a forward and backward of one norm over SmolLM2's
8 x 256 x 576 fp32 activations went through memory a dozen times or more (7-16 ms with the
weight frozen on the 2-core AVX2 EPYC, as the host's load varied), 61 norms a step.
``F.rms_norm`` saved ~10% (its backward is the same ops). Here the forward is one reduction
(``vector_norm``), one scaled multiply and the weight; the backward, with the
weight frozen (LoRA and the other adapters), is ``r * (g w - x r^2 mean(g w x))`` in four
passes, saving only ``x`` (kept anyway by the residual stream) and the per-row ``r``.

Inside :func:`fast_rms_norm` (the Trainer opens it while it trains eager on a CPU) the model's
RMSNorm modules of the Llama form are swapped for :class:`FastRMSNorm`, which holds the same
weight ``Parameter`` (state dicts, checkpoints and the optimizer see no change); on leaving the
originals come back. A class is swapped only after its own forward and this one agree on a
random input (so a variant such as Gemma's ``1 + weight`` is left alone), never a module with
hooks. Activations other than fp32/fp64 (bf16 training) take the model's formula: its two
bf16 rounding points are part of the model's numerics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from peftlab.runtime.module_swap import swapped_modules

_FAST_DTYPES = (torch.float32, torch.float64)


class _RMSNorm(torch.autograd.Function):
    """``weight * x * r`` with ``r = rsqrt(mean(x^2) + eps)`` over the last axis."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # one reduction pass, no x^2 temporary: |x|^2 / d, as Llama's mean(x^2)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        r = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, r)
        return torch.mul(x, r).mul_(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:  # the weight trains (full fine-tuning): sum of g * x * r
            grad_w = (grad * x * r).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gw = grad * weight
            # d/dx of x * r: r * (gw - x * r^2 * mean(gw * x)), as an in-place multiply-add
            coef = torch.linalg.vecdot(gw, x).unsqueeze(-1).mul_(r.pow(3)).div_(-x.shape[-1])
            grad_x = gw.mul_(r).addcmul_(x, coef)
        return grad_x, grad_w, None


class FastRMSNorm(nn.Module):
    """A Llama-form RMSNorm (``weight``, ``variance_epsilon``) computed by :class:`_RMSNorm`."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight  # the same Parameter: state_dict keys and optimizer unchanged
        self.variance_epsilon = norm.variance_epsilon
        self.model_forward = norm.forward  # a bound method, not a sub-module: keys unchanged

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in _FAST_DTYPES and self.weight.dtype == x.dtype and x.device.type == "cpu":
            return _RMSNorm.apply(x, self.weight, self.variance_epsilon)
        return self.model_forward(x)  # e.g. bf16: the model's own rounding points

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _llama_form(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    # a plain tensor: FSDP's sharded parameters are set on the module it knows, not a swap
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter)
            and type(weight.data) is torch.Tensor and weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float)
            and not (module._forward_hooks or module._forward_pre_hooks
                     or module._backward_hooks or module._backward_pre_hooks))


def _agrees(module: nn.Module) -> bool:
    """This class's forward and :class:`FastRMSNorm`'s give the same result (fp32, CPU)."""
    g = torch.Generator().manual_seed(0)
    width = module.weight.shape[0]
    x = torch.randn(2, 3, width, generator=g)
    probe = copy.deepcopy(module).to("cpu", torch.float32)  # a norm's weight: d numbers
    with torch.no_grad():
        probe.weight.copy_(torch.rand(width, generator=g) + 0.5)
        try:
            expected = probe(x)
        except Exception:  # noqa: BLE001 - any failure means: do not swap this class
            return False
        got = _RMSNorm.apply(x, probe.weight, module.variance_epsilon)
    return expected.shape == got.shape and torch.allclose(expected, got, rtol=1e-5, atol=1e-6)


@contextmanager
def fast_rms_norm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``model``'s Llama-form RMSNorms run :class:`_RMSNorm`; yields how
    many were swapped (0 when disabled or none qualifies)."""
    verdicts: dict[type, bool] = {}  # per class: its forward agrees with ours

    def replacement(child: nn.Module) -> nn.Module | None:
        if not enabled or not _llama_form(child):
            return None
        if type(child) not in verdicts:
            verdicts[type(child)] = _agrees(child)
        return FastRMSNorm(child) if verdicts[type(child)] else None

    with swapped_modules(model, replacement) as count:
        yield count
