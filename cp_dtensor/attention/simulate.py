"""Run the context-parallel attention of every CP rank inside one process, without a process group.

Each simulated rank is a thread running the very same call as the distributed op
(:func:`~cp_dtensor.attention.call.build_call`: validation, strategy, plan, the ring / all-gather / all-to-all
drivers), with :class:`~cp_dtensor.attention.transport.ThreadTransport` mailboxes in place of
``torch.distributed``. This is how one GPU checks the CUDA kernels inside the full ring algorithm, and how
the CPU tests cover many CP sizes cheaply.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cp_dtensor.attention.call import build_call, call_layout
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.transport import ThreadHub, ThreadTransport
from cp_dtensor.layout import (
    LayoutLike,
    LayoutRule,
    shard_sequence_for_rank,
    unshard_sequence_from_shards,
    validate_seq_len,
)

__all__ = ["SimulationResult", "simulate_context_parallel_attention"]


_RANK_THREADS: dict[int, tuple[ThreadPoolExecutor, threading.Lock]] = {}
_RANK_THREADS_LOCK = threading.Lock()


def _rank_threads(cp: int) -> tuple[ThreadPoolExecutor, threading.Lock]:
    """A pool of ``cp`` persistent threads (and its lock), created once per CP size.

    Persistent, not fresh per call: libraries keep per-thread state that is costly to rebuild. cuDNN's
    attention graphs, for one, are cached per thread; with fresh threads every call rebuilt them
    (measured on an H200: 0.1 s per block forward+backward instead of 0.4 ms).
    """
    with _RANK_THREADS_LOCK:
        if cp not in _RANK_THREADS:
            _RANK_THREADS[cp] = (ThreadPoolExecutor(cp, thread_name_prefix=f"cp-sim-{cp}"), threading.Lock())
        return _RANK_THREADS[cp]


@dataclass
class SimulationResult:
    """Full-sequence results (natural order) of a simulated CP attention run, plus per-rank stats."""

    out: torch.Tensor
    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None
    stats: list[AttentionStats]


def simulate_context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp: int,
    *,
    grad_out: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    layout: LayoutLike | LayoutRule = "zigzag",
    comm: str = "p2p",
    document_ids: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
    timeout_s: float = 300.0,
    a2a_size: int | None = None,
) -> SimulationResult:
    """Shard full ``q, k, v`` (B, H, S, D) over ``cp`` simulated ranks, run CP attention, unshard results.

    Args:
        q, k, v: full-sequence tensors in natural order.
        cp: number of simulated CP ranks.
        grad_out: if given, also run the backward with this output gradient.
        is_causal, scale, layout, comm, document_ids, window_size, backend, a2a_size: as for
            :func:`cp_dtensor.ring_attention` (``comm="hybrid"`` needs ``a2a_size``; its subgroups are
            sub-hubs of the simulation's hub).
        timeout_s: how long a simulated rank waits for a message before failing.

    Returns:
        :class:`SimulationResult` with full ``out`` (and ``dq, dk, dv`` when ``grad_out`` is given).
    """
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be a positive number of simulated ranks, got {cp!r}.")
    mask = AttentionMask.build(is_causal, window_size, document_ids)
    concrete = call_layout(layout, document_ids, cp)  # a rule: this batch's layout, as shard_batch would
    validate_seq_len(q.shape[2], cp, concrete)
    hub = ThreadHub(cp, timeout_s)
    results: list[dict[str, torch.Tensor] | None] = [None] * cp
    errors: list[BaseException] = []
    stats = [AttentionStats() for _ in range(cp)]

    def run_rank(rank: int) -> None:
        try:
            shard = [shard_sequence_for_rank(t, rank, cp, 2, concrete) for t in (q, k, v)]
            settings = CPSettings(
                layout=concrete, comm=comm, a2a_size=a2a_size, backend=backend, stats=stats[rank]
            )
            call = build_call(*shard, ThreadTransport(hub, rank), settings=settings, mask=mask, scale=scale)
            out, lse = call.forward(*shard)
            res = {"out": out}
            if grad_out is not None:
                dout = shard_sequence_for_rank(grad_out, rank, cp, 2, concrete)
                res["dq"], res["dk"], res["dv"] = call.backward(dout, *shard, out, lse)
            results[rank] = res
        except BaseException as e:  # surface the first failure, release the others
            errors.append(e)
            hub.abort()

    pool, lock = _rank_threads(cp)
    with lock:  # one simulation at a time per pool: its cp ranks must all run at once
        for f in [pool.submit(run_rank, r) for r in range(cp)]:
            f.result()
    if errors:
        raise errors[0]

    def full(name: str) -> torch.Tensor:
        return unshard_sequence_from_shards([r[name] for r in results], seq_dim=2, layout=concrete)  # type: ignore[index]

    grads = [full(n) for n in ("dq", "dk", "dv")] if grad_out is not None else [None, None, None]
    return SimulationResult(full("out"), *grads, stats=stats)
