"""Run a function on every rank: under ``torchrun`` as is, or by spawning local CPU processes.

``run_distributed(fn, world_size, *args)``: when the launcher environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...) is present, this process is one rank: initialize the process group and call ``fn``.
Otherwise spawn ``world_size`` local processes (gloo on CPU), each doing the same, so plain
``python script.py`` needs nothing else. If any rank fails, the others are terminated and a
:class:`LaunchError` names the first failing rank.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["LaunchError", "in_launcher_env", "init_distributed", "run_distributed"]


class LaunchError(RuntimeError):
    """A spawned rank failed; ``rank`` is the first one that did."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


def in_launcher_env() -> bool:
    """True when a launcher such as torchrun set RANK and WORLD_SIZE for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 300.0) -> None:
    """Initialize the default process group from the environment (NCCL on CUDA, else gloo)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def _spawned_entry(
    local_rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    timeout_s: float,
    threads: int,
    args: tuple,
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        init_distributed(timeout_s)
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    threads_per_rank: int = 0,
) -> None:
    """Call ``fn(*args)`` on every rank with the default process group initialized.

    Args:
        fn: a module-level (picklable) function.
        world_size: ranks to spawn when no launcher environment is present (ignored under torchrun).
        *args: picklable arguments for ``fn``.
        timeout_s: process-group timeout: a rank blocked longer than this in a collective fails.
        threads_per_rank: intra-op threads per spawned rank (0: cores / world_size, at least 1).

    Raises:
        LaunchError: a spawned rank failed (the others were terminated).
    """
    if in_launcher_env():
        init_distributed(timeout_s)
        try:
            fn(*args)
        finally:
            dist.destroy_process_group()
        return
    if threads_per_rank <= 0:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    port = _free_port()
    try:
        mp.spawn(
            _spawned_entry,
            args=(fn, world_size, port, timeout_s, threads_per_rank, args),
            nprocs=world_size,
            join=True,
        )
    except mp.ProcessRaisedException as e:
        raise LaunchError(e.error_index, f"rank {e.error_index} failed:\n{e.msg}") from None
    except mp.ProcessExitedException as e:
        raise LaunchError(e.error_index, f"rank {e.error_index} exited with code {e.exit_code}") from None
