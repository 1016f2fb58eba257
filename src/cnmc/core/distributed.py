"""Data-parallel training under ``torchrun``: the process group, each rank's share of an epoch,
and gathering a sharded result back into one.

``torchrun --standalone --nproc-per-node=N -m cnmc train ...`` (or ``--nnodes``/``--rdzv-*``
across machines) starts N processes with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; the same
command without torchrun is one process, and every function here is then a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs to MLflow and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


ONE_PROCESS = World()


def world_from_env() -> World:
    """The world torchrun describes in the environment (none: one process)."""
    return World(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


@contextmanager
def process_group(cuda: bool) -> Iterator[World]:
    """Join the torchrun job's process group (nccl on CUDA, gloo on CPU) for the duration."""
    world = world_from_env()
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    log.info("rank %d of %d joined the process group (%s)", world.rank, world.size, dist.get_backend())
    try:
        yield world
    finally:
        dist.destroy_process_group()


def gather_rows(part: np.ndarray, world: World) -> np.ndarray:
    """The whole result from every rank's rows ``rank::size`` (see :func:`evaluation_share`), in row order."""
    if not world.distributed:
        return part
    parts: list[np.ndarray | None] = [None] * world.size
    dist.all_gather_object(parts, part)
    n = sum(len(p) for p in parts if p is not None)
    out = np.empty((n, *part.shape[1:]), dtype=part.dtype)
    for rank, rows in enumerate(parts):
        out[rank :: world.size] = rows
    return out


def evaluation_share(n: int, world: World) -> np.ndarray:
    """This rank's rows of a held-out set: every ``size``-th from ``rank``, undone by :func:`gather_rows`."""
    return np.arange(world.rank, n, world.size)


def all_sum(values: list[float], world: World) -> list[float]:
    """The elementwise sum over ranks (e.g. a loss total and a count)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()
