"""Counters of CP attention calls: bytes sent, work done, kernel calls, time waiting for communication."""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["AttentionStats", "stats_by_handle"]


@dataclass
class AttentionStats:
    """Counters of one or more CP attention calls on this rank, whatever the strategy (pass ``stats=``).

    Attributes:
        bytes_sent_forward: bytes this rank sent during forward.
        bytes_sent_backward: bytes this rank sent during backward.
        score_elements_forward: visible (query, key) score elements over all forward kernel calls
            (batch x query heads x visible pairs of each block).
        score_elements_backward: the same for the backward kernel calls.
        kernel_calls_forward: number of forward kernel calls.
        kernel_calls_backward: number of backward kernel calls.
        comm_wait_seconds: time spent blocked waiting for communication (fwd + bwd): wall time on CPU; on
            CUDA the time the compute stream waited for the communication streams, from CUDA events
            around each wait (NCCL's host-side ``wait()`` returns at once, so wall time would read ~0);
            those are added by :meth:`settle` once the events have completed.
    """

    bytes_sent_forward: int = 0
    bytes_sent_backward: int = 0
    score_elements_forward: int = 0
    score_elements_backward: int = 0
    kernel_calls_forward: int = 0
    kernel_calls_backward: int = 0
    comm_wait_seconds: float = 0.0
    _cuda_waits: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        _LIVE[id(self)] = self

    @property
    def handle(self) -> int:
        """An integer naming this object, for the custom ops (Note [Stats handles])."""
        return id(self)

    def count(self, phase: str, score_elements: int) -> None:
        """Account one kernel call of ``phase`` ("forward" or "backward") computing ``score_elements``."""
        if phase == "forward":
            self.score_elements_forward += score_elements
            self.kernel_calls_forward += 1
        else:
            self.score_elements_backward += score_elements
            self.kernel_calls_backward += 1

    @contextlib.contextmanager
    def waiting(self, device: torch.device | None) -> Iterator[None]:
        """Time the block as communication wait: CUDA events on the current stream for a CUDA ``device``
        (resolved by :meth:`settle`), wall clock otherwise."""
        if device is not None and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._cuda_waits.append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self.comm_wait_seconds += time.perf_counter() - t0

    def settle(self) -> None:
        """Add the recorded CUDA waits to ``comm_wait_seconds`` (synchronizes with those events)."""
        for start, end in self._cuda_waits:
            end.synchronize()
            self.comm_wait_seconds += start.elapsed_time(end) / 1000.0
        self._cuda_waits.clear()


# Note [Stats handles]: custom ops take no Python objects, so a compiled call names its AttentionStats by an
# integer. Every AttentionStats registers itself here when created (eagerly, before anything is compiled) and
# is held weakly: a lookup table that changes no result, only where counters go.
_LIVE: weakref.WeakValueDictionary[int, AttentionStats] = weakref.WeakValueDictionary()


def stats_by_handle(handle: int) -> AttentionStats | None:
    """The live :class:`AttentionStats` with this :attr:`~AttentionStats.handle`, or None."""
    return _LIVE.get(handle) if handle else None
