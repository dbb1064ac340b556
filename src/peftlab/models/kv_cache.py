"""The KV cache's keyword, spelled as the installed transformers spells it.

transformers 5.24 renamed the cache argument of every model's ``forward`` from
``past_key_values`` to ``cache``, and the output field with it; the old names keep working
through a deprecation shim (with a warning) until 5.40. Code that calls a model passes the
cache under the name its ``forward`` declares; forward hooks that read or rewrite a backbone's
keyword arguments accept either spelling from their caller (HF ``generate``, peft, a user) and
hand the backbone the declared one. Decided by inspecting the signature, not by version
strings, so both sides of the rename work.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")  # newest first


def cache_keyword(module: nn.Module) -> str | None:
    """The name ``module.forward`` takes its KV cache under, or None if it takes none."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to splat into a call of ``module``."""
    name = cache_keyword(module)
    if name is None:
        raise TypeError(f"{type(module).__name__}.forward takes no KV cache argument "
                        f"(none of {CACHE_NAMES})")
    return {name: cache}


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in a call's keyword arguments, whichever name the caller used (None if none)."""
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError(f"got a KV cache under both {given[0]!r} and {given[1]!r}; pass one")
    return kwargs[given[0]] if given else None


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a call's keyword arguments (either name) and return it."""
    cache = given_cache(kwargs)
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    return cache


def output_cache_name(output: Any) -> str | None:
    """The field a model output keeps its cache in (``cache`` from 5.24 on)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return next((name for name in CACHE_NAMES if name in fields), None)


def output_cache(output: Any) -> Any:
    """The cache a model returned (None if it returned none)."""
    name = output_cache_name(output)
    return getattr(output, name) if name is not None else None
