"""The one harness for multi-process tests: a reusable pool of gloo worker processes.

Starting a process group costs seconds on 2 cores, so a :class:`DistributedPool` of ``world_size``
processes is started once per session and world size (see the ``dist_pool`` fixture in ``conftest.py``)
and runs many test functions. ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank (``fn`` must be a
module-level function, importable by the workers) and returns the per-rank results in rank order. If a
rank raises, the call raises with that rank's traceback; if ranks do not answer within the timeout (a
hang), the pool is torn down and the call raises, and the next call starts a fresh pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_CTX = mp.get_context("spawn")
_PARALLEL_DIMS: dict[tuple, Any] = {}  # per worker process, by degrees (new groups are slow on gloo)


def cached_parallel_dims(**degrees: Any) -> Any:
    """``ParallelDims(**degrees)`` with its mesh built, once per worker process and degree mix."""
    from cp_dtensor.parallel_dims import ParallelDims

    key = tuple(sorted(degrees.items()))
    if key not in _PARALLEL_DIMS:
        pd = ParallelDims(**degrees)
        pd.build_mesh("cpu")
        _PARALLEL_DIMS[key] = pd
    return _PARALLEL_DIMS[key]


def cached_world_mesh(**degrees: Any) -> Any:
    """The 4-D world mesh of :func:`cached_parallel_dims`."""
    return cached_parallel_dims(**degrees).world_mesh


def _worker_main(
    rank: int, world_size: int, init_file: str, tasks: Any, results: Any, pg_timeout_s: float
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=pg_timeout_s),
    )
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            out = fn(*args, **kwargs)
            results.put((rank, task_id, ("ok", out)))
        except BaseException:
            results.put((rank, task_id, ("error", traceback.format_exc())))
    dist.destroy_process_group()


class DistributedPool:
    """``world_size`` spawned processes with an initialized gloo default process group."""

    def __init__(
        self, world_size: int, *, pg_timeout_s: float = 120.0, start_timeout_s: float = 180.0
    ) -> None:
        self.world_size = world_size
        self._init_dir = tempfile.TemporaryDirectory(prefix="cpd_pool_")
        init_file = os.path.join(self._init_dir.name, "init")
        self._results = _CTX.Queue()
        self._tasks = [_CTX.Queue() for _ in range(world_size)]
        self._procs = [
            _CTX.Process(
                target=_worker_main,
                args=(r, world_size, init_file, self._tasks[r], self._results, pg_timeout_s),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._next_id = 0
        self.broken = False
        ready = 0
        deadline = time.monotonic() + start_timeout_s
        while ready < world_size:
            _rank, tag, _ = self._get(deadline, "start")
            ready += tag == "ready"

    def _get(self, deadline: float, what: str) -> tuple:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close(force=True)
                raise TimeoutError(f"DistributedPool({self.world_size}): no answer during {what} (hang?)")
            try:
                return self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self.close(force=True)
                    raise RuntimeError(
                        f"DistributedPool({self.world_size}): rank(s) {dead} died during {what}"
                    ) from None

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 600.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if self.broken:
            raise RuntimeError("DistributedPool is broken; create a new one")
        task_id = self._next_id
        self._next_id += 1
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        out: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < self.world_size:
            rank, tid, payload = self._get(deadline, f"{fn.__name__}")
            if tid == task_id:
                out[rank] = payload
                if payload[0] == "error":
                    # Other ranks may be stuck in a collective with the failed one: restart the pool.
                    self.close(force=True)
                    raise AssertionError(f"rank {rank} failed in {fn.__name__}:\n{payload[1]}")
        return [out[r][1] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        """Stop the workers (politely unless ``force``)."""
        self.broken = True
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._init_dir.cleanup()
