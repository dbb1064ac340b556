"""Reading and writing the files a run depends on, so a bad one is named, never a traceback.

Every JSON and safetensors file peftlab reads goes through :func:`read_json` /
:func:`read_safetensors`: a truncated or hand-edited file becomes a :class:`CorruptFileError`
that names the path and what is wrong with it. Every file a run writes for later use goes
through :func:`write_text_atomic` (a temporary file renamed into place), so a crash leaves
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


class CorruptFileError(ValueError):
    """A file exists but cannot be read as what it should be; the message names it."""


def read_json(path: str | os.PathLike, expect: type = dict) -> Any:
    """Parse a JSON file; ``expect`` is the type the top level must have."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} "
                               f"column {exc.colno}); the file may be truncated") from None
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, expect):
        raise CorruptFileError(f"{path}: expected a JSON {_json_kind(expect)}, "
                               f"got {_json_kind(type(data))}")
    return data


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (never a pickle)."""
    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptFileError(f"{path}: not a readable safetensors file ({_first_line(exc)}); "
                               "the file may be truncated or not safetensors at all") from None


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptFileError` unless the header parses and the file holds every
    byte the header promises (safetensors checks the size on open; the data is not read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptFileError(f"{path}: not a readable safetensors file ({_first_line(exc)})"
                               ) from None


def check_can_write(path: str | os.PathLike, what: str, directory: bool = False) -> None:
    """Raise a one-line ValueError now if ``path`` could not be written later (a file where
    a folder must be created, a directory where a file belongs or vice versa, no write
    permission) -- before an expensive load, not after it. Missing folders are created."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{what}: {path} exists and is not a directory")
    if not directory and path.is_dir():
        raise ValueError(f"{what}: {path} is a directory; give a file path")
    ancestor = next(p for p in (path.parent, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise ValueError(f"{what}: cannot create {path}: {ancestor} is a file")
    target = path if path.exists() else ancestor
    if not os.access(target, os.W_OK):
        raise ValueError(f"{what}: {path} is not writable (permission denied on {target})")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory."""
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` then rename over ``path``; the temporary file never survives."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string"}.get(t, t.__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
