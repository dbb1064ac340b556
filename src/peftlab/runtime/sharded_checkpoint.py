"""Sharded checkpoints (``train.distributed: fsdp``) with torch.distributed.checkpoint (DCP).

Every rank writes its own shards of the trainable weights and of the optimizer state, keyed by
parameter name (``get_state_dict``), plus rank 0's ``trainer_state.json``. DCP records each
shard's place in the full tensor, so a checkpoint written by W ranks loads into any number of
ranks (2 -> 1 tested), or into one process without a process group. The same atomic install as
peftlab.runtime.checkpoint: written under ``<name>.tmp``, renamed into place by rank 0 once every
rank has finished (a barrier).

Not pickle-free, unlike the ddp checkpoints: DCP's filesystem format stores its shard index
(``.metadata``) with pickle, and ``dcp.load`` unpickles it. Resume only checkpoints you wrote.
(torch's HuggingFace safetensors storage for DCP was not adopted: untested here for optimizer
state and resharding.)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from peftlab.files import read_json
from peftlab.runtime.checkpoint import DCP_METADATA_FILE as METADATA_FILE
from peftlab.runtime.checkpoint import STATE_FILE, install, prune_checkpoints
from peftlab.runtime.distributed import World


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
    state: dict[str, Any] = {"model": weights}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict[str, Any], world: World) -> Path:
    """Every rank calls this; rank 0 installs ``directory`` once all shards are written."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if world.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    world.barrier()
    with _single_process_quiet():
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), no_dist=world.size == 1)
    if world.main:
        full = dict(state, format="dcp", world_size=world.size,
                    torch_rng=torch.get_rng_state().tolist())
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=1))
    world.barrier()
    if world.main:
        install(tmp, directory)
    world.barrier()
    return directory


def load_sharded(directory: Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore this rank's shards (any earlier world size); return the trainer state."""
    directory = Path(directory)
    if not is_sharded_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: not a sharded peftlab checkpoint "
                                f"(no {METADATA_FILE}; written with train.distributed: ddp?)")
    state = read_json(directory / STATE_FILE)
    target = _state(model, optimizer)
    with _single_process_quiet():
        dcp.load(target, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
    set_model_state_dict(model, target["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, target["optim"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns at every save/load without a process group ("assuming the intent is to save in
    a single process"), which is exactly what a one-process fsdp run means: silence that one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable "
                                "or uninitialized", category=UserWarning)
        yield


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()


def save_step_sharded(root: Path, step: int, model: nn.Module,
                      optimizer: torch.optim.Optimizer, state: dict[str, Any], world: World,
                      keep: int = 2) -> Path:
    path = save_sharded(Path(root) / f"step-{step:07d}", model, optimizer, state, world)
    if world.main:
        prune_checkpoints(root, keep)
    return path
