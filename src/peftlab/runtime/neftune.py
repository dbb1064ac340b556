"""NEFTune (Jain et al. 2023, ``train.neftune_alpha``): noisy input embeddings while training.

Each forward in training mode adds uniform noise in ``[-m, m]``, ``m = alpha / sqrt(L * d)``
(L the batch's padded sequence length, d the embedding width), to the output of the input
embeddings -- the rule of transformers' and TRL's ``neftune_noise_alpha``. A forward hook that
checks ``module.training``, so evaluation (``model.eval()``) and generation never see noise,
and that exists only inside the :func:`neftune` block the training loop opens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn


def add_noise(module: nn.Module, inputs: Any, output: torch.Tensor, alpha: float) -> torch.Tensor:
    """The forward hook: noise on ``output`` in training mode, ``output`` itself otherwise."""
    if not module.training:
        return output
    magnitude = alpha / math.sqrt(output.size(1) * output.size(-1))
    return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)


@contextmanager
def neftune(model: nn.Module, alpha: float | None) -> Iterator[None]:
    """Inside the block, the input embeddings of ``model`` are noisy in training mode (no-op
    for ``alpha`` None)."""
    if alpha is None:
        yield
        return
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise ValueError(f"train.neftune_alpha: {type(model).__name__} has no input embeddings")
    handle = embeddings.register_forward_hook(partial(add_noise, alpha=alpha))
    try:
        yield
    finally:
        handle.remove()
