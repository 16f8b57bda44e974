"""Shared pytest fixtures: the pool of distributed workers (see dist_harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from dist_harness import DistributedPool


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--report-dir",
        default=None,
        help="write the measured tables (attention errors, training parity) as markdown files into this folder",
    )


@pytest.fixture(scope="session")
def report_dir(request: pytest.FixtureRequest) -> Path | None:
    """Folder for measured tables (``--report-dir``), or None."""
    value = request.config.getoption("--report-dir")
    if value is None:
        return None
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
