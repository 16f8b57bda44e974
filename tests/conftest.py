"""Shared pytest fixtures: the pool of distributed workers (see dist_harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from dist_harness import DistributedPool


@pytest.fixture(scope="session")
def dist_pool() -> Iterator[Callable[[int], DistributedPool]]:
    """Factory ``dist_pool(world_size)``: a live gloo pool of that size, started once and reused."""
    pools: dict[int, DistributedPool] = {}

    def get(world_size: int) -> DistributedPool:
        pool = pools.get(world_size)
        if pool is None or pool.broken:
            pool = pools[world_size] = DistributedPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close(force=True)  # nothing left to flush; killing idle workers saves seconds per pool


@pytest.fixture(autouse=True)
def _single_thread_and_seed() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
