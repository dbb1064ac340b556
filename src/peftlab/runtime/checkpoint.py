"""Atomic, pickle-free checkpoints: trainable weights, optimizer state, trainer state.

A checkpoint is a directory written under a temporary name and renamed into place,
so a crash mid-write never leaves a checkpoint that looks complete. Tensors go to
safetensors, everything else to JSON — nothing is ever unpickled on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from peftlab.files import CorruptFileError, check_safetensors, read_json, read_safetensors

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
DCP_METADATA_FILE = ".metadata"  # a sharded checkpoint (peftlab.runtime.sharded_checkpoint)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically to ``directory`` (replacing any older one there)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    full_state = dict(state, optimizer=opt_meta,
                      torch_rng=torch.get_rng_state().tolist())
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1))
    return install(tmp, directory)


def install(tmp: Path, directory: Path) -> Path:
    """Rename the complete ``tmp`` into ``directory``; an older copy goes to ``<name>.old``
    first and is removed last (:func:`recover_interrupted` finishes a move a crash cut)."""
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def load_checkpoint(directory: Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore trainable weights (and optimizer state); return the trainer state."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{directory}: not a peftlab checkpoint (no {STATE_FILE})")
    state = read_json(state_path)
    weights = read_safetensors(directory / WEIGHTS_FILE)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise ValueError(f"{directory}: checkpoint does not match the model "
                         f"(missing {missing[:3]}, unexpected {unknown[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    if optimizer is not None:
        _restore_optimizer(optimizer, read_safetensors(directory / OPTIMIZER_FILE),
                           state["optimizer"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state


def check_checkpoint(directory: Path) -> None:
    """Raise CorruptFileError/FileNotFoundError unless every file of the checkpoint reads."""
    directory = Path(directory)
    if (directory / DCP_METADATA_FILE).is_file():  # train.distributed: fsdp (sharded, DCP)
        state = read_json(directory / STATE_FILE)
        if "torch_rng" not in state:
            raise CorruptFileError(f"{directory / STATE_FILE}: missing key 'torch_rng'")
        return
    for name in (STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a peftlab checkpoint (no {name})")
    state = read_json(directory / STATE_FILE)
    for key in ("optimizer", "torch_rng"):  # what load_checkpoint reads for every task
        if key not in state:
            raise CorruptFileError(f"{directory / STATE_FILE}: missing key {key!r}")
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
        check_safetensors(directory / name)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete, readable ``step-*`` checkpoint under ``root``.

    ``*.tmp`` (a write that never finished) and ``*.old`` leftovers are never picked; a newest
    checkpoint that does not read (a disk that filled up, a file damaged later) is skipped
    with a warning, and the one before it is used.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    recover_interrupted(root)
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()
                    and not p.name.endswith((".tmp", ".old"))),
                   key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for path in steps:
        try:
            check_checkpoint(path)
        except (CorruptFileError, FileNotFoundError) as exc:
            print(f"warning: skipping checkpoint {path}: {exc}", file=sys.stderr)
            continue
        return path
    return None


def recover_interrupted(root: Path) -> None:
    """Undo a replacement that a crash cut in half: ``save_checkpoint`` moves the old copy to
    ``<name>.old`` before renaming the new one into place; if ``<name>`` is missing, the old
    copy is the last complete one (its trainer state is what the step checkpoints expect)."""
    for old in Path(root).glob("*.old"):
        target = old.with_name(old.name.removesuffix(".old"))
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)


def save_step(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
              state: dict[str, Any], keep: int = 2) -> Path:
    """``root/step-NNNNNNN``, then only the newest ``keep`` step checkpoints are kept."""
    path = save_checkpoint(Path(root) / f"step-{step:07d}", model, optimizer, state)
    prune_checkpoints(root, keep)
    return path


def prune_checkpoints(root: Path, keep: int) -> None:
    steps = sorted((p for p in Path(root).glob("step-*") if p.is_dir()
                    and not p.name.endswith((".tmp", ".old"))),
                   key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep] if keep > 0 else steps:
        shutil.rmtree(old, ignore_errors=True)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
