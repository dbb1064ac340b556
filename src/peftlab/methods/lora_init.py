"""LoRA inits that start from the base weight (PiSSA, OLoRA), and their plain-LoRA form.

PiSSA (Meng et al. 2024) puts the top-r singular triplets of W into the adapter,
OLoRA (Büyükakyüz 2024) the first r columns/rows of W's QR decomposition; both write the
rest back as the frozen base, ``W_res = W - scaling * B0 A0``, so the model is unchanged at
step 0 but trains the principal part of W. The maths is peft's (``init_lora_weights=
"pissa"/"olora"``), so initial adapters and residuals are equal to peft's (tested).

A trained adapter is only meaningful on ``W_res``. Saved against the original W it becomes
a plain LoRA of rank 2r, as peft's ``path_initial_model_for_weight_conversion`` writes it:

    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]

with alpha doubled (times sqrt(2) under rsLoRA) so the scaling s is unchanged. That file
loads in peft, llama.cpp converters and peftlab alike, on the unmodified base model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BASE_CHANGING_INITS = ("pissa", "olora")


def check_rank(init: str, r: int, module: str, out_features: int, in_features: int) -> str | None:
    """Why ``init`` cannot give rank ``r`` on an (out, in) weight, or None if it can."""
    if r > min(out_features, in_features):
        return (f"init {init!r} takes r={r} singular/QR directions of {module!r}, whose weight "
                f"is {out_features}x{in_features}; r must be <= {min(out_features, in_features)}")
    return None


@torch.no_grad()
def initial_factors(init: str, weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A0 (r, in), B0 (out, r)) in fp32 from the base weight ``weight`` (out, in).

    PiSSA: W = U S V^T, A0 = sqrt(S_r/s) V_r^T, B0 = U_r sqrt(S_r/s), so s B0 A0 is W's best
    rank-r approximation. OLoRA: W = Q R, A0 = R[:r], B0 = Q[:, :r] (no division by s, as in
    peft: s B0 A0 is then s times the first r QR components).
    """
    w = weight.detach().float()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    raise ValueError(f"init {init!r} does not start from the base weight "
                     f"(those are {list(BASE_CHANGING_INITS)})")


def as_plain_lora(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor) -> tuple[Tensor, Tensor]:
    """The rank-2r factors [A ; A0], [B | -B0] of ``s (B A - B0 A0)``: the adapter relative to
    the original base weight (peft's ``subtract_mutated_init`` layout)."""
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1)


def plain_alpha(alpha: float, use_rslora: bool) -> float:
    """alpha of the rank-2r plain adapter with the same scaling (alpha/r or alpha/sqrt(r))."""
    return alpha * math.sqrt(2) if use_rslora else 2 * alpha
