"""Merging several LoRA adapters into one (linear, TIES, DARE), from their files alone.

Each adapter i contributes its weight update per module, ``dW_i = s_i B_i A_i`` (the task
vector of TIES/DARE, restricted to the adapted modules); the rules combine those:

- ``linear``: ``sum_i w_i dW_i``. Stored exactly as the concatenation ``[B_1 .. B_n]``,
  ``[w_1 s_1 A_1; ..; w_n s_n A_n]`` (rank = the sum of ranks; peft's ``cat``), or, with
  ``rank``, as its best rank-``rank`` approximation (truncated SVD; peft's ``svd``).
- ``ties`` (Yadav et al. 2023): keep each dW_i's top ``density`` share of entries by
  magnitude, elect a sign per entry (sign of the sum, or of the count with
  ``majority_sign: frequency``), and average the weighted entries that agree with it.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): keep each entry with probability
  ``density`` and rescale it by 1/density, then sum (linear) or elect signs (ties). The masks
  come from a generator seeded by ``seed`` and the module name, so a merge is reproducible and
  a module's mask does not depend on which other modules the adapters have.

TIES and DARE results are not low-rank any more; they are stored as their truncated SVD at
``rank`` (default: the sum of the input ranks) and the relative error of that truncation is
reported per module. These are peft's ``add_weighted_adapter`` rules ``cat``, ``svd``,
``ties_svd``, ``dare_linear_svd`` and ``dare_ties_svd`` (tested against peft). peft's
factor-wise ``linear``/``ties``/``dare_*``, which combine the A's and the B's separately (a
product with cross terms B_i A_j), are not offered.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from peftlab.methods import peft_format

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGNS = ("total", "frequency")


@dataclass
class LoraFile:
    """One LoRA adapter as read from disk: per module (A, B) and the scaling."""

    path: Path
    raw: dict[str, Any]
    scaling: float
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.raw.get("r", 8))


def read_lora_file(directory: str | os.PathLike) -> LoraFile:
    """Read a (peft or peftlab) LoRA adapter for merging; DoRA and trained full modules
    (``modules_to_save``) cannot be merged and are refused, naming the file and key."""
    fields_, config_path = peft_format.read_config(directory)
    if fields_["use_dora"]:
        raise ValueError(f"{config_path}: key 'use_dora' is true: DoRA's per-row magnitudes do "
                         "not combine linearly; only plain LoRA adapters can be merged")
    if fields_["modules_to_save"]:
        raise ValueError(f"{config_path}: key 'modules_to_save' = {fields_['modules_to_save']}: "
                         "fully trained modules (e.g. a classifier head) cannot be merged")
    if fields_["init"] in ("pissa", "olora"):
        raise ValueError(f"{config_path}: key 'init_lora_weights' = {fields_['init']!r}: this "
                         "adapter is relative to a modified base; load it with peftlab and save "
                         "it again (a plain LoRA of the original base) before merging")
    tensors, weights_path = peft_format.read_weights(directory)
    r, alpha = fields_["r"], fields_["alpha"]
    scaling = alpha / (math.sqrt(r) if fields_["use_rslora"] else r)
    raw, _ = peft_format.read_raw_config(directory)
    lora = LoraFile(Path(directory), raw, scaling)
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = peft_format.split_key(key)
        if parsed is None:
            raise ValueError(f"{weights_path}: unexpected key {key!r} (not a LoRA tensor)")
        parts.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not parts:
        raise ValueError(f"{weights_path}: holds no LoRA tensors")
    for module, kinds in parts.items():
        for kind in ("lora_A", "lora_B"):
            if kind not in kinds:
                raise ValueError(f"{weights_path}: missing key "
                                 f"'{peft_format.PREFIX}{module}.{kind}.weight'")
        a, b = kinds["lora_A"].float(), kinds["lora_B"].float()
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{weights_path}: module {module!r} has rank {a.shape[0]}/"
                             f"{b.shape[1]} (A/B), but {config_path} says r={r}")
        lora.factors[module] = (a, b)
    return lora


# ----------------------------------------------------------------------------- the rules


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (TIES' trim step)."""
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=k).indices] = 1
    return delta * mask.view_as(delta)


def random_prune(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with probability ``density``, rescaled by 1/density (DARE)."""
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def elect_and_merge(deltas: Tensor, weights: Tensor, majority_sign: str) -> Tensor:
    """TIES' sign election and disjoint mean over stacked (pruned) deltas (n, out, in): the
    sign of each entry is that of the sum (``total``) or of most nonzero deltas
    (``frequency``); the weighted entries agreeing with it are averaged."""
    sign = deltas.sign()
    votes = deltas.sum(0) if majority_sign == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    weighted = deltas * weights.view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(deltas: list[Tensor], weights: list[float], combination: str, density: float | None,
            majority_sign: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """One module's merged update from the adapters' updates by ``combination``."""
    w = torch.tensor(weights, dtype=deltas[0].dtype)
    if combination == "linear":
        return (torch.stack(deltas) * w.view(-1, 1, 1)).sum(0)
    if density is None:
        raise ValueError(f"combination {combination!r} needs a density")
    if combination == "ties":
        pruned = [magnitude_prune(d, density) for d in deltas]
    else:
        if generator is None:
            raise ValueError("DARE needs a seeded generator")
        pruned = [random_prune(d, density, generator) for d in deltas]
    stacked = torch.stack(pruned)
    if combination == "dare_linear":
        return (stacked * w.view(-1, 1, 1)).sum(0)
    return elect_and_merge(stacked, w, majority_sign)


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """(A (rank, in), B (out, rank), relative Frobenius error) of ``delta``'s truncated SVD,
    with B = U S and A = V^T as peft's SVD merge writes them (to be used with scaling 1)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    if k < rank:  # a tiny module: pad to the common rank with zeros
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    total = float(s.pow(2).sum())
    error = math.sqrt(float(s[k:].pow(2).sum()) / total) if total > 0 else 0.0
    return a.contiguous(), b.contiguous(), error


def module_generator(seed: int, module: str) -> torch.Generator:
    """DARE's generator for one module: from the seed and the module's name only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


# ----------------------------------------------------------------------------- adapters


@dataclass
class MergedAdapter:
    """The merged adapter's peft config and tensors, and how exact it is."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    rank: int
    errors: dict[str, float]  # module -> relative error of the rank truncation
    weights: list[float]  # as used (the defaults filled in)


def default_weights(combination: str, n: int) -> list[float]:
    """linear / dare_linear: the average (1/n each); ties / dare_ties: 1 each, since the
    disjoint mean already averages the agreeing entries."""
    return [1.0 / n] * n if combination in ("linear", "dare_linear") else [1.0] * n


def check_options(n: int, weights: list[float] | None, combination: str,
                  density: float | None, majority_sign: str, rank: int | None) -> None:
    """Every option error in one line, before any file is read."""
    if n < 1:
        raise ValueError("merge-adapters: give at least one adapter (--adapter DIR)")
    if combination not in COMBINATIONS:
        raise ValueError(f"--combination: {combination!r} is not one of {list(COMBINATIONS)}")
    if weights is not None and len(weights) != n:
        raise ValueError(f"--weights: {len(weights)} weights for {n} adapters")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--weights: {weights} must be finite numbers")
    if combination == "linear" and density is not None:
        raise ValueError("--density: only for ties, dare_linear and dare_ties")
    if combination != "linear" and density is None:
        raise ValueError(f"--density is required for {combination} (the share of each "
                         "adapter's update to keep, e.g. 0.5)")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"--density must be in (0, 1], got {density}")
    if majority_sign not in MAJORITY_SIGNS:
        raise ValueError(f"--majority-sign: {majority_sign!r} is not one of {list(MAJORITY_SIGNS)}")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")


def _check_compatible(files: list[LoraFile]) -> None:
    first = files[0]
    for key in ("base_model_name_or_path", "task_type", "fan_in_fan_out"):
        for other in files[1:]:
            if other.raw.get(key) != first.raw.get(key):
                raise ValueError(f"{other.path}: key {key!r} is {other.raw.get(key)!r}, but "
                                 f"{first.path} has {first.raw.get(key)!r}; adapters to merge "
                                 "must belong to the same base model")
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for lora in files:
        for module, (a, b) in lora.factors.items():
            shape = (b.shape[0], a.shape[1])
            if module in shapes and shapes[module][0] != shape:
                raise ValueError(f"{lora.path}: module {module!r} is {shape[0]}x{shape[1]}, "
                                 f"but {shapes[module][0][0]}x{shapes[module][0][1]} in "
                                 f"{shapes[module][1]}")
            shapes.setdefault(module, (shape, lora.path))


def merge_lora_adapters(adapters: list[str | os.PathLike], weights: list[float] | None = None,
                        combination: str = "linear", density: float | None = None,
                        majority_sign: str = "total", rank: int | None = None,
                        seed: int = 0) -> MergedAdapter:
    """Merge LoRA adapter directories into one adapter (not written; see :func:`save_merged`)."""
    check_options(len(adapters), weights, combination, density, majority_sign, rank)
    files = [read_lora_file(d) for d in adapters]
    _check_compatible(files)
    weights = list(weights) if weights is not None else default_weights(combination, len(files))
    modules = sorted({m for f in files for m in f.factors})
    exact = combination == "linear" and rank is None
    out_rank = rank or sum(f.rank for f in files)
    tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for module in modules:
        present = [(f, w) for f, w in zip(files, weights, strict=True) if module in f.factors]
        if exact:
            a = torch.cat([w * f.scaling * f.factors[module][0] for f, w in present])
            b = torch.cat([f.factors[module][1] for f, _ in present], dim=1)
            pad = out_rank - a.shape[0]  # a module some adapters do not have
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            errors[module] = 0.0
        else:
            deltas = [f.scaling * (f.factors[module][1] @ f.factors[module][0]) for f, _ in present]
            delta = combine(deltas, [w for _, w in present], combination, density, majority_sign,
                            module_generator(seed, module))
            a, b, errors[module] = low_rank(delta, out_rank)
        tensors[f"{peft_format.PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{peft_format.PREFIX}{module}.lora_B.weight"] = b.contiguous()
    first = files[0].raw
    config = peft_format.peft_config_dict(
        r=out_rank, alpha=out_rank,  # scaling 1: the factors carry the weights and scalings
        dropout=float(first.get("lora_dropout", 0.0)), target_modules=modules,
        layers_to_transform=None, use_rslora=False, use_dora=False, init="kaiming",
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)), modules_to_save=None,
        base_model_name_or_path=first.get("base_model_name_or_path"),
        task_type=first.get("task_type"))
    return MergedAdapter(config, tensors, out_rank, errors, weights)


def save_merged(merged: MergedAdapter, directory: str | os.PathLike) -> None:
    peft_format.write_adapter(directory, merged.config, merged.tensors)
