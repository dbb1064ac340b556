"""The new-run form, generated from the config dataclasses (core sections, every registered
method's and task's own), so a new key or method shows up in the form without UI code."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from peftlab.config import REPORT_TO, DataConfig, EvalConfig, TrainConfig, task_sections
from peftlab.models.embedded import EMBEDDED_ALIASES
from peftlab.plugins import METHODS, TASKS

# known choices of plain string keys (the rest are free text, checked by the loader)
_CHOICES = {"train.scheduler": ["cosine", "linear", "constant"],
            "train.precision": ["auto", "bf16", "fp32"],
            "train.compile": ["auto", "true", "false"],
            "train.distributed": ["ddp", "fsdp"]}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".raw")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is not None and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return "|".join(_type_name(a) for a in inner) + "|null"
    if origin is list:
        return "list"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def fields(cls: type, prefix: str) -> list[dict[str, Any]]:
    """One form field per dataclass field: key, type, default (JSON), choices; nested
    dataclasses (e.g. data.clean) are left to the YAML box."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        key = f"{prefix}.{f.name}"
        out.append({"key": key, "type": _type_name(hint),
                    "default": default if isinstance(default, (str, int, float, bool, list,
                                                               type(None))) else str(default),
                    "choices": _CHOICES.get(key)})
    return out


def form_schema(data_dirs: list[Path]) -> dict[str, Any]:
    return {
        "models": [{"name": alias, "description": d} for alias, d in EMBEDDED_ALIASES.items()],
        "tasks": [spec.name for spec in TASKS],
        "methods": {m.name: fields(m.config_cls, "method") for m in METHODS},
        "sections": {"train": fields(TrainConfig, "train"), "data": fields(DataConfig, "data"),
                     "eval": fields(EvalConfig, "eval"),
                     **{name: fields(cls, name) for name, cls in task_sections().items()}},
        "report_to": list(REPORT_TO),
        "data_files": data_files(data_dirs),
    }


def data_files(dirs: list[Path]) -> list[str]:
    """The data sets offered in the form: data files up to two folders deep."""
    files = []
    for root in dirs:
        if not root.is_dir():
            continue
        for depth in ("*", "*/*"):
            files += [str(p) for p in sorted(root.glob(depth))
                      if p.is_file() and p.suffix in DATA_SUFFIXES]
    return files


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw['train']['lr'] = value`` for ``key='train.lr'``."""
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if isinstance(child, str) and part == "method":
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[last] = value
