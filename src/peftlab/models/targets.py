"""Which modules a method adapts: names of the Linear/Conv1D layers inside transformer blocks.

Methods (LoRA and friends) import :func:`find_target_modules`; it only ever returns names of
the model's original layers, so it gives the same answer before and after a method wrapped
them (a wrapper keeps the original as ``base_layer`` next to its own ``lora_A``/``lora_B``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

ALL_LINEAR = "all-linear"

# A transformer block index in a dotted module name: "model.layers.3.", "bert.encoder.layer.0.",
# "transformer.h.11.", "blocks.2.", T5's "block.1.". Bare base models start with the container.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# Output heads: trained in full (modules_to_save) if at all, never adapted by "all-linear".
_HEADS = frozenset({"lm_head", "classifier", "score", "pooler", "qa_outputs", "cls"})

_LINEAR_TYPES = (nn.Linear, Conv1D)


def block_index(name: str) -> int | None:
    """The transformer block a module lives in, or None for modules outside the blocks."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def _base(module: nn.Module) -> nn.Module:
    """The original layer behind (possibly nested) method wrappers."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _is_internal(name: str) -> bool:
    """Method internals: the wrapped original and the adapter's own layers."""
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every original Linear/Conv1D by full name (wrapped ones under their original name)."""
    found: dict[str, nn.Module] = {}
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if not name or _is_internal(name) or any(name.startswith(w + ".") for w in wrappers):
            continue
        if module is not _base(module):
            wrappers.append(name)  # nothing below a wrapper is an original layer
        if isinstance(_base(module), _LINEAR_TYPES):
            found[name] = module
    return found


def _is_head(name: str, module: nn.Module, output: nn.Module | None) -> bool:
    return module is output or any(part in _HEADS for part in name.split("."))


def _all_linear(model: nn.Module, linears: dict[str, nn.Module]) -> list[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    candidates = [n for n, m in linears.items() if not _is_head(n, _base(m), output)]
    in_blocks = [n for n in candidates if block_index(n) is not None]
    # A model without recognisable blocks (a toy MLP): every linear except the heads, as peft.
    return in_blocks or candidates


def _matches(name: str, spec: str | Iterable[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def find_target_modules(
    model: nn.Module,
    target_modules: str | list[str],
    layers_to_transform: list[int] | None = None,
) -> list[str]:
    """Full dotted names of Linear/Conv1D modules to adapt.

    "all-linear" = every nn.Linear and transformers Conv1D inside the transformer blocks
    (attention + MLP), never the LM head / classifier / score / pooler, which live outside them.
    A list matches a module whose full name equals an entry or ends with "." + entry (peft
    semantics); any other str is a regex that must re.fullmatch the full name.
    ``layers_to_transform`` keeps only modules whose block index is listed.
    Names under ``.base_layer`` and LoRA internals (``lora_A``/``lora_B``) are never returned.
    Raises ValueError naming the spec if nothing matches.
    """
    spec = _check_spec(target_modules)
    linears = linear_modules(model)
    if spec == ALL_LINEAR:
        names = _all_linear(model, linears)
    else:
        names = [n for n in linears if _matches(n, spec)]
    if layers_to_transform is not None:
        keep = {int(i) for i in layers_to_transform}
        names = [n for n in names if block_index(n) in keep]
    if not names:
        raise ValueError(_no_match_message(model, target_modules, layers_to_transform, linears))
    return names


def _check_spec(target_modules: str | list[str]) -> str | list[str]:
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            return target_modules
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {err}") from err
        return target_modules
    spec = list(target_modules)
    if not spec or not all(isinstance(t, str) and t for t in spec):
        raise ValueError(f"target_modules={target_modules!r} must be 'all-linear', a regex "
                         "or a non-empty list of module names")
    return spec


def _no_match_message(model: nn.Module, spec: str | list[str], layers: list[int] | None,
                      linears: dict[str, nn.Module]) -> str:
    detail = f" in layers {layers}" if layers is not None else ""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
    blocks = sorted({i for i in map(block_index, linears) if i is not None})
    hint = f"; its Linear/Conv1D names end with: {', '.join(suffixes)}" if suffixes else ""
    if blocks:
        hint += f"; block indices {blocks[0]}..{blocks[-1]}"
    return (f"target_modules={spec!r} matched no Linear/Conv1D module{detail} "
            f"of {type(model).__name__}{hint}")
