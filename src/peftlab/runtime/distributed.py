"""Data parallelism over torch.distributed, for runs launched by ``torchrun``.

Every rank holds the whole (frozen) model and the same data. Each optimizer step's
micro-batches are dealt round-robin to the ranks; the token count that normalises the loss
and the gradients are summed across ranks before the step. So W ranks with
``train.grad_accum: g`` compute the very update one process computes with ``g * W`` (tested),
and every rank keeps identical weights. Only rank 0 writes files (metrics, checkpoints,
adapter, reports). Backend: gloo (the Trainer keeps tensors on the CPU). No ``DistributedDataParallel`` wrapper: with
adapters the trainable state is small, one flat all-reduce per step is enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (a no-op in a single process)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter], extra: list[float]) -> list[float]:
        """Sum the gradients of ``params`` (a rank without a micro-batch this step adds zeros)
        and the ``extra`` numbers over ranks, in one all-reduce. Returns the summed extras."""
        if self.size == 1:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor(extra, dtype=torch.float32, device=grads[0].device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].tolist()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values (e.g. adapter init)."""
        if self.size == 1:
            return
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def choose(self, options: list[str], mine: str) -> str:
        """Rank 0's pick among ``options`` (e.g. ``precision: auto`` measured per machine)."""
        if self.size == 1:
            return mine
        t = torch.tensor([options.index(mine)])
        dist.broadcast(t, src=0)
        return options[int(t)]


def init_world() -> World:
    """The process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the
    environment), initialised once; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size())
