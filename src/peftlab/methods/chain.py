"""Chained runs: start from an earlier run's adapted weights (``init_from``).

A run with ``init_from: runs/dapt`` (a run directory, or the adapter directory inside it)
loads ``model``, loads the earlier adapter into it and merges it into the base weights
before its own method is applied -- e.g. continued pre-training first, then a classifier.
Only methods that declare ``merge`` (LoRA, IA3) can be folded in; the others are refused
before anything is loaded.

The merged weights are not saved again. Instead the new adapter directory gets
``init_from.json``, the list of adapters to merge (in order) before it is loaded, and
:func:`load_adapter` -- which ``peftlab.load``, ``export``, ``eval`` and ``predict`` use --
rebuilds the starting point from it. An earlier run that was itself chained contributes its
own list first, so chains of any length rebuild exactly. Paths are stored absolute: moving
an earlier run breaks the chain with an error naming the missing directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.config import ConfigError
from peftlab.files import read_json, write_text_atomic
from peftlab.methods.registry import Method, get_method, method_for_adapter_dir, method_names

INIT_FILE = "init_from.json"
_CONFIG = "adapter_config.json"


def adapter_dir_of(path: str | Path, key: str = "init_from") -> Path:
    """The adapter directory of a run directory (``<run>/adapter``) or an adapter directory."""
    p = Path(path)
    for candidate in (p, p / "adapter"):
        if (candidate / _CONFIG).is_file():
            return candidate
    if not p.exists():
        raise ConfigError(f"{key}: {path}: no such run or adapter directory")
    raise ConfigError(f"{key}: {path}: not a run directory (no adapter/{_CONFIG}) or an "
                      f"adapter directory (no {_CONFIG})")


def recorded_chain(adapter_dir: str | Path) -> list[Path]:
    """The adapters merged before ``adapter_dir`` was trained (its ``init_from.json``)."""
    path = Path(adapter_dir) / INIT_FILE
    if not path.is_file():
        return []
    entries = read_json(path).get("chain")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(
            e.get("adapter"), str) for e in entries):
        raise ValueError(f"{path}: key 'chain' must be a list of {{\"adapter\": path}} entries")
    return [Path(e["adapter"]) for e in entries]


def init_chain(path: str | Path, base_model: str) -> list[Path]:
    """Every adapter to merge, in order, to start from ``path`` (``init_from``): the chain
    it was itself trained on, then its own adapter. Checked before anything is loaded:
    each exists, declares ``merge`` and was trained on ``base_model``."""
    adapter = adapter_dir_of(path).resolve()
    chain = [*recorded_chain(adapter), adapter]
    mergeable = [n for n in method_names() if get_method(n).merge is not None]
    for directory in chain:
        if not (directory / _CONFIG).is_file():
            raise ConfigError(f"init_from: {path} was trained on top of {directory}, which no "
                              f"longer exists (chained runs keep absolute paths; see "
                              f"{adapter / INIT_FILE})")
        try:
            method = method_for_adapter_dir(directory)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"init_from: {err}") from None
        if method.merge is None:
            raise ConfigError(f"init_from: {directory} holds a {method.name} adapter, which "
                              f"cannot be merged into the base weights (only "
                              f"{' and '.join(mergeable)} can); train the earlier run with one "
                              "of those")
        trained_on = read_json(directory / _CONFIG).get("base_model_name_or_path")
        if trained_on is not None and str(trained_on) != str(base_model):
            raise ConfigError(f"init_from: {directory} was trained on model {trained_on!r}, "
                              f"but this run's model is {base_model!r}; set model: {trained_on}")
    return chain


def merge_chain(model: nn.Module, chain: list[Path]) -> None:
    """Load and merge every adapter of ``chain`` into ``model``'s base weights, in order.

    A task's extras saved next to an adapter (an MLM or classification head) are not
    loaded: the next run has its own head.
    """
    for directory in chain:
        method = method_for_adapter_dir(directory)
        _merge_one(model, method, directory)


def _merge_one(model: nn.Module, method: Method, directory: Path) -> None:
    if method.merge is None:  # init_chain refuses these; a hand-edited init_from.json may not
        raise ValueError(f"{directory}: a {method.name} adapter cannot be merged")
    method.load(model, directory, adapter_name="default")
    method.merge(model)


def write_chain(adapter_dir: str | Path, chain: list[Path]) -> None:
    """Record ``chain`` in the new adapter directory (nothing for an unchained run)."""
    if not chain:
        return
    entries: list[dict[str, Any]] = [
        {"adapter": str(d), "method": method_for_adapter_dir(d).name} for d in chain]
    write_text_atomic(Path(adapter_dir) / INIT_FILE, json.dumps({"chain": entries}, indent=2))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Method:
    """Load a saved adapter into ``model``, first merging the chain it was trained on (if
    any, from its ``init_from.json``); returns the adapter's method."""
    adapter_dir = Path(adapter_dir)
    merge_chain(model, recorded_chain(adapter_dir))
    method = method_for_adapter_dir(adapter_dir)
    method.load(model, adapter_dir, adapter_name="default")
    return method

