"""Data parallelism over torch.distributed, for runs launched by ``torchrun``.

Every rank holds the whole (frozen) model and the same data. Each optimizer step's
micro-batches are dealt round-robin to the ranks; the token count that normalises the loss
and the gradients are summed across ranks before the step. So W ranks with
``train.grad_accum: g`` compute the very update one process computes with ``g * W`` (tested),
and every rank keeps identical weights. Only rank 0 writes files (metrics, checkpoints,
adapter, reports). No ``DistributedDataParallel`` wrapper: with adapters the trainable state is
small, one flat all-reduce per step is enough. ``train.distributed: fsdp`` shards the model
instead (peftlab.runtime.fsdp).

Each rank computes on its ``train.device`` (peftlab.runtime.device: ``cuda:LOCAL_RANK`` under
``auto`` on a GPU machine); the backend follows it: nccl on CUDA, gloo otherwise. Collective
buffers are created on that device (nccl only reduces CUDA tensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from peftlab.runtime.device import backend_for, resolve_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: the GPU for nccl, the CPU for gloo (which cannot
        reduce e.g. MPS tensors)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (a no-op in a single process)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items``: every ``size``-th one from ``rank`` (no padding,
        no duplicates; the shares of all ranks together are ``items`` exactly once)."""
        return items[self.rank::self.size]

    def gather(self, mine: list[Any]) -> list[Any] | None:
        """Undo :meth:`shard` on rank 0: its ``items`` in their order (None on other ranks;
        ``mine`` as is in one process)."""
        if self.size == 1:
            return mine
        parts: list[Any] = [None] * self.size if self.main else []
        dist.gather_object(mine, parts if self.main else None, dst=0)
        if not self.main:
            return None
        out: list[Any] = [None] * sum(len(p) for p in parts)
        for r, part in enumerate(parts):
            out[r::self.size] = part
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum_gradients(self, params: list[torch.nn.Parameter], extra: list[float]) -> list[float]:
        """Sum the gradients of ``params`` (a rank without a micro-batch this step adds zeros)
        and the ``extra`` numbers over ranks, in one all-reduce. Returns the summed extras."""
        if self.size == 1:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        comm = self.comm_device
        flat = torch.cat([g.reshape(-1).float().to(comm) for g in grads]
                         + [torch.tensor(extra, dtype=torch.float32, device=comm)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += n
        return flat[offset:].tolist()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values (e.g. adapter init)."""
        if self.size == 1:
            return
        with torch.no_grad():
            for t in tensors:
                if t.device == self.comm_device:
                    dist.broadcast(t.data, src=0)
                else:  # e.g. MPS weights under gloo: through a CPU copy
                    buf = t.data.to(self.comm_device)
                    dist.broadcast(buf, src=0)
                    t.data.copy_(buf)

    def choose(self, options: list[str], mine: str) -> str:
        """Rank 0's pick among ``options`` (e.g. ``precision: auto`` measured per machine)."""
        if self.size == 1:
            return mine
        t = torch.tensor([options.index(mine)], device=self.comm_device)
        dist.broadcast(t, src=0)
        return options[int(t)]


def init_world(device: str = "cpu") -> World:
    """The process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT
    in the environment), initialised once; a single process otherwise. ``device`` is
    ``train.device``, resolved for this rank's LOCAL_RANK (ConfigError if not available)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)  # nccl's collectives use the current device
    if size <= 1:
        return World(device=resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(resolved))
    return World(dist.get_rank(), dist.get_world_size(), resolved)
