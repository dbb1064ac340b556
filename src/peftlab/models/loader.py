"""One way to get a (model, tokenizer) pair from whatever the user names.

A spec is an embedded alias, a local directory, a .gguf file (converted once via the cache)
or a Hugging Face hub id. Weights are only ever read from safetensors, never unpickled.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from peftlab.models.embedded import EMBEDDED_ALIASES, gguf_to_cache, resolve_embedded

logger = logging.getLogger(__name__)

MODEL_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    # BERT-style encoders with their MLM head (task: pretrain). A checkpoint saved without the
    # head (e.g. the embedded MiniLM sentence encoder) gets a new one; its decoder is tied to
    # the word embeddings, so only the small transform and the output bias are new.
    "masked_lm": AutoModelForMaskedLM,
}


def load_model(
    spec: str,
    kind: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    quiet: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer for ``spec``; the model's mode (train/eval) is left to the caller.

    kind: "causal_lm", "masked_lm" or "sequence_classification" (``labels`` names the classes
    and sets id2label/label2id; ``num_labels`` alone gives anonymous classes). ``quiet``: no
    transformers load report, for a caller that restores the missing weights (a saved
    classification head) right after.
    """
    auto_cls = _model_class(kind)
    extra = _label_kwargs(num_labels, labels)
    if extra and kind != "sequence_classification":
        raise ValueError(f"num_labels/labels only apply to kind='sequence_classification', not {kind!r}")
    source = resolve_spec(spec)
    tokenizer = _tokenizer_from(source, spec)
    try:
        with quiet_transformers() if quiet else contextlib.nullcontext():
            model = auto_cls.from_pretrained(source, dtype=dtype, use_safetensors=True, **extra)
    except OSError as err:
        raise ValueError(f"could not load model {spec!r} from {source}: {err}") from err
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs errors only inside the block (its verbosity is restored after)."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_model(spec)`` would return, without loading the weights."""
    return _tokenizer_from(resolve_spec(spec), spec)


def resolve_spec(spec: str) -> Path | str:
    """A local model directory for ``spec``, or the hub id itself when it must be downloaded."""
    spec = str(spec)
    if spec in EMBEDDED_ALIASES:
        return resolve_embedded(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return gguf_to_cache(ggufs[0], ggufs[0].stem)  # a folder holding just a GGUF
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_to_cache(path, path.stem)
        raise ValueError(f"model {spec!r} is a file; expected a model directory or a .gguf file")
    if not _looks_like_hub_id(spec):
        raise ValueError(f"model {spec!r}: no such file or directory{_suggest(spec)}")
    cached = _hub_snapshot(spec)
    if cached is not None:
        return cached
    if not _hub_reachable():
        raise ValueError(
            f"model {spec!r}: not a local path, not an embedded model, and not in the Hugging "
            f"Face cache; hub ids load offline only once downloaded, and the hub is unreachable"
            f"{_suggest(spec)}")
    return spec


def _model_class(kind: str):
    if kind not in MODEL_CLASSES:
        close = difflib.get_close_matches(kind, list(MODEL_CLASSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model kind {kind!r}{hint}; choose from {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[kind]


def _label_kwargs(num_labels: int | None, labels: list[str] | None) -> dict:
    if labels is None:
        if num_labels is None:
            return {}
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        return {"num_labels": num_labels}
    labels = [str(label) for label in labels]
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and unique, got {labels}")
    if num_labels is not None and num_labels != len(labels):
        raise ValueError(f"num_labels={num_labels} but {len(labels)} labels given: {labels}")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def _tokenizer_from(source: Path | str, spec: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer for {spec!r} from {source}: {err}") from err
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            logger.warning("tokenizer of %s has no pad, eos or unk token; batches cannot be padded",
                           spec)
        else:
            tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"  # training pads on the right; generation switches locally
    return tokenizer


def _looks_like_hub_id(spec: str) -> bool:
    if spec.startswith((".", "~", "/")) or spec.lower().endswith(".gguf"):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot dir of a hub model, so loading it never touches the network.

    (transformers 5 probes the hub for adapter_config.json even with local_files_only=True,
    retrying for ~25 s when offline; a local directory avoids that.)
    """
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None


def _hub_reachable() -> bool:
    """Cheap offline check, so a missing model fails now instead of after ~45 s of retries."""
    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _suggest(spec: str) -> str:
    close = difflib.get_close_matches(spec.lower(), list(EMBEDDED_ALIASES), n=1, cutoff=0.4)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; embedded models (work offline): {', '.join(EMBEDDED_ALIASES)}"
