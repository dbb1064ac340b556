"""``train.distributed: fsdp``: the model sharded over the ranks with FSDP2
(``torch.distributed.fsdp.fully_shard``), for full fine-tuning (and LoRA on a large base) of a
model whose weights, gradients and optimizer state do not fit one machine.

Each transformer block is one FSDP unit (its parameters all-gathered just before its forward
and backward, freed after). The backbone is the root unit but keeps every parameter outside the
blocks (embeddings, final norm, LM head) whole on every rank (``ignored_params``): the tasks'
losses call the backbone and then use the LM head's weight directly (the chunked head
cross-entropy of models/lm.py), outside any FSDP forward, so that weight must be a plain tensor.
Those replicated parameters' gradients are summed over ranks by one all-reduce, as in ddp. So
the blocks (most of a model's weights: ~80% of SmolLM2-135M, ~96% of a 7B Llama) are sharded.

FSDP2 averages the reduce-scattered gradients over ranks; :func:`sync_gradients` multiplies
them by the world size so the update is the token-sum one process computes
(``set_gradient_divide_factor(1.0)`` would avoid the multiply, but it uses
ReduceOp.PREMUL_SUM, which gloo rejects: "Cannot use ReduceOp.PREMUL_SUM with Gloo", torch
2.13). Every collective FSDP2 needs (all_gather_into_tensor, reduce_scatter_tensor) runs on
gloo on CPU (tested).

After training, :func:`gather_full_model` puts the full weights into a plain (unsharded) copy of
the model on every rank, so rank 0 alone can evaluate and save the usual peft/safetensors files
(and the ranks can share the generation): the full model must then fit each machine once (the
final file holds it anyway). The copy's skeleton is taken before sharding with its parameters on
the meta device (:func:`meta_skeleton`), so it costs no memory during training. (FSDP2 offers no
"unshard for good": ``unshard()`` keeps the module sharded for ``state_dict()``, which then
returns DTensors that safetensors cannot save.)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
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
    """``fully_shard`` every block, then the backbone as the root with everything outside the
    blocks left whole, over a 1-D mesh of all ranks on ``world.device``; returns the number of
    blocks. Parameters keep their names (block parameters become DTensors)."""
    blocks = find_blocks(model)
    backbone = getattr(model, "base_model", None)
    if blocks is None or backbone is None or not any(b is blocks for b in backbone.modules()):
        raise ConfigError(f"train.distributed: fsdp cannot find the transformer blocks of "
                          f"{type(model).__name__} (a ModuleList named layers/layer/h/blocks "
                          "inside model.base_model); use ddp")
    if world.device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.distributed: fsdp runs on cpu or cuda, not "
                          f"{world.device.type} (train.device); use ddp")
    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    in_blocks = {id(p) for p in blocks.parameters()}
    fully_shard(backbone, mesh=mesh,
                ignored_params={p for p in backbone.parameters() if id(p) not in in_blocks})
    return len(blocks)


def sync_gradients(params: list[nn.Parameter], world: World,
                   extra: list[float]) -> list[float]:
    """After backward on every rank: the gradient sums over ranks (sharded gradients, which
    FSDP averaged, times the world size; whole ones all-reduced) and ``extra`` summed."""
    whole = []
    for p in params:
        if isinstance(p, DTensor):
            if p.grad is not None:
                p.grad.mul_(world.size)
        else:
            whole.append(p)
    if whole:
        return world.sum_gradients(whole, extra)
    return world.sum(extra)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (L2, same coefficient) over a mix of sharded and
    whole gradients, which torch's version cannot stack together; returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        squares += float(local_value(norm)) ** 2
    total = float(squares.sqrt())
    coef = min(max_norm / (total + 1e-6), 1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef)
    return total


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


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are on the meta device (no storage); buffers
    (small; rotary tables are not in the state dict) are copied."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().clone()
    return copy.deepcopy(model, memo)


def gather_full_model(model: nn.Module, skeleton: nn.Module) -> nn.Module:
    """The sharded ``model``'s full weights in ``skeleton`` (from :func:`meta_skeleton`), which
    is returned; every rank calls this (an all-gather of every parameter)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    skeleton.load_state_dict(full, strict=False, assign=True)
    if callable(getattr(skeleton, "tie_weights", None)):
        skeleton.tie_weights()  # tied names were assigned separately
    left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"fsdp: no full weights gathered for {left[:3]}")
    return skeleton
