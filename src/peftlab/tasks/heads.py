"""Task-owned heads: a new classification or reward head that the method leaves frozen
(methods without ``modules_to_save``) is trained by the task and saved next to the adapter.

One file format for both directions, so training, ``peftlab eval``, ``predict`` and PPO's
reward scorer read back exactly what the task wrote.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from peftlab.files import read_safetensors


def save_head(params: dict[str, nn.Parameter], path: str | Path) -> None:
    """Write the head parameters (fp32, by their model-level names) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: p.detach().float().cpu().contiguous() for k, p in params.items()}, str(path),
              metadata={"format": "pt"})


def load_head(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the saved head tensors into ``model``; every key must name a parameter of the
    same shape. Returns the keys loaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the adapter's task saved its head there)")
    params = dict(model.named_parameters())
    tensors = read_safetensors(path)
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key not in params:
                raise ValueError(f"{path}: unexpected key {key!r} (no such parameter in "
                                 f"{type(model).__name__})")
            if params[key].shape != tensor.shape:
                raise ValueError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, the model "
                                 f"expects {tuple(params[key].shape)}")
            params[key].copy_(tensor)
    return sorted(tensors)
