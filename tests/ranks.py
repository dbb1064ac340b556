"""What every multi-process test needs: a free loopback port and a spawned rank's environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def as_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """Inside a spawned process: torchrun's variables for ``rank`` of ``world`` on loopback,
    one thread (two ranks share the machine's cores), and the process group torn down after."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
