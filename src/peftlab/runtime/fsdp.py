"""``train.distributed: fsdp``: the model sharded over the ranks with FSDP2
(``torch.distributed.fsdp.fully_shard``), for full fine-tuning (and LoRA on a large base) of a
model whose weights, gradients and optimizer state do not fit one machine.

Each transformer block is one FSDP unit (its parameters all-gathered just before its forward
and backward, freed after), the root holds the rest (embeddings, final norm, LM head). FSDP2
averages the reduce-scattered gradients over ranks; the Trainer scales each rank's loss by the
world size so the update is the token-mean one process computes (``set_gradient_divide_factor``
would do it without the scaling, but uses ReduceOp.PREMUL_SUM, which gloo does not support:
"Cannot use ReduceOp.PREMUL_SUM with Gloo", torch 2.13). Every collective FSDP2 needs
(all_gather_into_tensor, reduce_scatter_tensor) runs on gloo on CPU (tested).

After training, :func:`unshard_for_inference` gathers the full weights on every rank so rank 0
alone can evaluate and save the usual peft/safetensors files: the full model must then fit each
machine once (the final file holds it anyway).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from peftlab.errors import ConfigError
from peftlab.runtime.distributed import World

BLOCK_LIST_NAMES = ("layers", "layer", "h", "blocks")


def find_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks: the first ModuleList named layers/layer/h/blocks holding more
    than one module of a single type (None if the model has none)."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 1
                and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES
                and len({type(m) for m in module}) == 1):
            return module
    return None


def shard_model(model: nn.Module, world: World) -> int:
    """``fully_shard`` every block, then the root, over a 1-D mesh of all ranks on
    ``world.device``; returns the number of blocks. Parameters keep their names (as DTensors)."""
    blocks = find_blocks(model)
    if blocks is None:
        raise ConfigError(f"train.distributed: fsdp cannot find the transformer blocks of "
                          f"{type(model).__name__} (a ModuleList named layers/layer/h/blocks); "
                          "use ddp")
    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def remap_param_groups(groups: list[dict[str, Any]], names: dict[int, str],
                       model: nn.Module) -> list[dict[str, Any]]:
    """The optimizer groups again, on the sharded parameters that replaced the originals
    (``names``: id of each original parameter -> its name, taken before sharding)."""
    now = dict(model.named_parameters())
    return [dict(g, params=[now[names[id(p)]] for p in g["params"]]) for g in groups]


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a DTensor (e.g. clip_grad_norm_'s total norm over shards)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def unshard_for_inference(model: nn.Module) -> None:
    """Gather the full weights on every rank and keep them there (no re-sharding after a
    forward): from here on each rank runs forwards alone, with plain parameters, so rank 0 can
    evaluate and save by itself. Called once on every rank after training."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
