"""Models: embedded offline models, one loader for every kind of spec, and target discovery."""

from peftlab.models.embedded import (
    EMBEDDED_ALIASES,
    cache_root,
    gguf_to_cache,
    is_cache_dir,
    resolve_embedded,
)
from peftlab.models.loader import MODEL_CLASSES, load_model, load_tokenizer, resolve_spec
from peftlab.models.targets import ALL_LINEAR, block_index, find_target_modules, linear_modules

__all__ = [
    "ALL_LINEAR",
    "EMBEDDED_ALIASES",
    "MODEL_CLASSES",
    "block_index",
    "cache_root",
    "find_target_modules",
    "gguf_to_cache",
    "is_cache_dir",
    "linear_modules",
    "load_model",
    "load_tokenizer",
    "resolve_embedded",
    "resolve_spec",
]
