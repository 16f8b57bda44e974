"""Run a function on every rank: under ``torchrun`` as is, or by spawning local CPU processes.

``run_distributed(fn, world_size, *args)``: when the launcher environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...) is present, this process is one rank: initialize the process group and call ``fn``.
Otherwise spawn ``world_size`` local processes (gloo on CPU), each doing the same, so plain
``python script.py`` needs nothing else.

Note [Failing ranks]
~~~~~~~~~~~~~~~~~~~~
::

    rank r raises / dies  ->  parent notes the FIRST failure (rank, exit code or exception)
                          ->  other ranks get `grace_s` to finish on their own (they usually fail fast:
                              gloo sees the closed connection), then SIGTERM, then SIGKILL
                          ->  LaunchError(rank, ...): one line for an expected error (bad input), the
                              failing rank's traceback otherwise; errors of later ranks are not repeated

A rank stuck in a collective whose peer is alive but silent fails after the process-group timeout.

Note [Ending a rank]
~~~~~~~~~~~~~~~~~~~~
A rank that used a gloo process group ends with :func:`end_process` (``os._exit`` after flushing), never by
interpreter teardown::

    training done -> barrier / destroy_process_group -> flush stdio + logging -> os._exit(code)
                                                      (not: unwind modules, free objects, C++ statics)

Objects that outlive ``destroy_process_group`` (meshes referenced from modules, gloo work items holding
tensors) are otherwise freed while the interpreter unwinds, and a backend thread that touches Python then
aborts the process: "terminate called without an active exception", SIGABRT, no Python frame left, after
the rank had logged "Process group destroyed" - a finished run reported as failed (seen in CI on the
four-rank torchtitan tp2 x cp2 run). Spawned ranks (:func:`run_distributed`), ``train.py``
and the torchtitan entry point all end this way.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "LaunchError",
    "RankFailure",
    "end_process",
    "in_launcher_env",
    "init_distributed",
    "run_distributed",
]

_CTX = mp.get_context("spawn")


@dataclass
class RankFailure:
    """How one spawned rank failed."""

    rank: int
    exit_code: int | None
    error_type: str = ""
    message: str = ""
    traceback: str = ""
    expected: bool = False
    stopped: list[int] = field(default_factory=list)  # ranks still running that the launcher stopped

    def describe(self) -> str:
        """One line: which rank, and the exception or the signal/exit code (and who had to be stopped)."""
        if self.error_type:
            line = (
                f"rank {self.rank}: {self.error_type}: {self.message}" if not self.expected else self.message
            )
        elif self.exit_code is not None and self.exit_code < 0:
            line = f"rank {self.rank} was killed by signal {signal.Signals(-self.exit_code).name}"
        else:
            line = f"rank {self.rank} exited with code {self.exit_code}"
        if self.stopped and not self.expected:
            line += f" (rank(s) {self.stopped} had not exited and were stopped: hung or stuck waiting)"
        return line


class LaunchError(RuntimeError):
    """A spawned rank failed; ``failure`` describes the first one that did."""

    def __init__(self, failure: RankFailure) -> None:
        detail = "" if failure.expected or not failure.traceback else f"\n{failure.traceback.rstrip()}"
        super().__init__(failure.describe() + detail)
        self.failure = failure
        self.rank = failure.rank


def in_launcher_env() -> bool:
    """True when a launcher such as torchrun set RANK and WORLD_SIZE for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(timeout_s: float = 300.0, init_file: str | None = None) -> None:
    """Initialize the default process group (NCCL on CUDA, else gloo).

    Rendezvous through the launcher's environment (MASTER_ADDR/PORT), or through ``init_file`` (a file
    store: no TCP port to pick, so concurrent local jobs cannot collide).
    """
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if init_file is None:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(seconds=timeout_s),
        )


def _spawned_entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    init_file: str,
    timeout_s: float,
    threads: int,
    args: tuple,
    expected_errors: tuple[type[BaseException], ...],
    errors: Any,
) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(threads)
    try:
        init_distributed(timeout_s, init_file=init_file)
        fn(*args)
    except BaseException as e:
        expected = isinstance(e, expected_errors)
        errors.put((rank, type(e).__name__, str(e), "" if expected else traceback.format_exc(), expected))
        end_process(2 if expected else 1)  # peers may be gone
    _finish()
    end_process(0)  # Note [Ending a rank]


def end_process(code: int) -> None:
    """End this process now with ``code``: flush stdio and logging, then skip interpreter teardown.

    For the last line of a rank's entry point (Note [Ending a rank]); never returns.
    """
    logging.shutdown()  # flushes and closes every handler (log files included)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing more can be written
            stream.flush()
    os._exit(code)


def _finish() -> None:
    """Leave the process group together: nobody tears down a connection a peer is still using."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _stop(procs: list[Any], term_wait_s: float = 3.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + term_wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    threads_per_rank: int = 0,
    expected_errors: tuple[type[BaseException], ...] = (),
    grace_s: float = 5.0,
) -> None:
    """Call ``fn(*args)`` on every rank with the default process group initialized.

    Args:
        fn: a module-level (picklable) function.
        world_size: ranks to spawn when no launcher environment is present (ignored under torchrun).
        *args: picklable arguments for ``fn``.
        timeout_s: process-group timeout: a rank blocked longer than this in a collective fails.
        threads_per_rank: intra-op threads per spawned rank (0: cores / world_size, at least 1).
        expected_errors: exception types that mean bad input rather than a bug: reported as one line.
        grace_s: after the first failure, how long the other ranks may take to stop on their own.

    Raises:
        LaunchError: a spawned rank failed (see Note [Failing ranks]).
    """
    if in_launcher_env():
        init_distributed(timeout_s)
        fn(*args)
        _finish()
        return
    if threads_per_rank <= 0:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    rendezvous = tempfile.TemporaryDirectory(prefix="cpd_rendezvous_")
    init_file = os.path.join(rendezvous.name, "store")
    errors = _CTX.SimpleQueue()
    procs = [
        _CTX.Process(
            target=_spawned_entry,
            args=(r, fn, world_size, init_file, timeout_s, threads_per_rank, args, expected_errors, errors),
            name=f"rank{r}",
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    reported: dict[int, tuple] = {}
    first: RankFailure | None = None
    deadline = None
    try:
        while any(p.is_alive() for p in procs):
            # A rank reports its exception before it exits, so the queue orders failures correctly;
            # exit codes catch the ranks that died without a word (killed).
            while not errors.empty():
                item = errors.get()
                reported.setdefault(item[0], item)
                if first is None:
                    first = RankFailure(item[0], None)
            if first is None:
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0):
                        first = RankFailure(r, p.exitcode)
                        break
            if first is not None and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        stopped = {r for r, p in enumerate(procs) if p.is_alive()}  # ranks we terminate: never the cause
        _stop(procs)
        rendezvous.cleanup()
    while not errors.empty():
        item = errors.get()
        reported.setdefault(item[0], item)
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0 and r not in stopped]
    if first is None and not failed:
        return
    cause = _root_cause(first, failed, reported, procs)
    cause.stopped = sorted(stopped)
    raise LaunchError(cause)


# Messages of ranks that failed only because a peer went away (not the root cause of a failure).
_PEER_FAILURE_HINTS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
)


def _root_cause(
    first: RankFailure | None, failed: list[int], reported: dict[int, tuple], procs: list
) -> RankFailure:
    """The failure to report: a rank that died silently (killed), else the first real exception."""

    def failure(rank: int) -> RankFailure:
        f = RankFailure(rank, procs[rank].exitcode)
        if rank in reported:
            _, f.error_type, f.message, f.traceback, f.expected = reported[rank]
        return f

    killed = [r for r in failed if r not in reported and (procs[r].exitcode or 0) < 0]
    if first is not None and first.rank in killed:
        return failure(first.rank)
    if killed and (first is None or _is_peer_failure(reported.get(first.rank))):
        return failure(killed[0])
    if first is not None and not _is_peer_failure(reported.get(first.rank)):
        return failure(first.rank)
    real = [r for r in reported if not _is_peer_failure(reported[r])]  # in order of arrival
    if real:
        return failure(real[0])
    return failure(first.rank if first is not None else failed[0])


def _is_peer_failure(item: tuple | None) -> bool:
    return item is not None and any(hint in item[2] for hint in _PEER_FAILURE_HINTS)
