"""Where tensors live: ``train.device`` resolved once, and the one helper that moves batches.

``auto`` picks ``cuda:LOCAL_RANK`` when CUDA is available (each torchrun rank its own GPU),
else ``mps``, else ``cpu``. An explicit device that this machine does not have is a
ConfigError naming ``train.device``, not a CUDA traceback mid-run. The process-group backend
follows the device: nccl for CUDA, gloo for everything else.

Only the CPU paths run in this project's tests (no GPU on the build machine); the CUDA/MPS
branches are the standard torch calls, reasoned about, not executed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from peftlab.config import check_device_spec
from peftlab.errors import ConfigError


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str, local_rank: int = 0, where: str = "train.device") -> torch.device:
    """``train.device`` -> the torch.device this process computes on."""
    check_device_spec(spec, where)
    if spec == "auto":
        if _cuda_available():
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ConfigError(f"{where}: 'mps' is not available on this machine "
                              "(use auto or cpu)")
        return torch.device("mps")
    if not _cuda_available():  # cuda or cuda:N
        raise ConfigError(f"{where}: {spec!r} but CUDA is not available on this machine "
                          f"(torch {torch.__version__}; use auto or cpu)")
    if spec == "cuda":  # under torchrun: this rank's GPU
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    index = int(spec.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{where}: {spec!r} but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for ``device``: nccl on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device`` (dicts, lists and tuples walked; other
    values returned as they are). A no-op copy-free return when already there."""
    if torch.is_tensor(obj):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_device(v, device) for v in obj)
    return obj


def move_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` (parameters and buffers) on ``device``, in place; the one place models move."""
    return model if model_device(model) == device else model.to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (cpu for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
