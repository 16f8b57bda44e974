"""Instruments of one rank: saved-for-backward bytes, attention work, bytes sent, time blocked in comm.

* :func:`saved_bytes_during` - bytes autograd saves for backward inside a block,
* :class:`CountingOp` - visible score elements (work) of every call of an attention op,
* :class:`TimedTransport` - cp_dtensor's process-group transport that times its waits,
* :class:`CollectiveMeter` - bytes sent by, and time blocked in, PyTorch's functional collectives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cp_dtensor.attention.transport import Pending, ProcessGroupTransport
from cp_dtensor.tools.bench.theory import score_elements

__all__ = [
    "CollectiveMeter",
    "CountingOp",
    "TimedTransport",
    "functional_collective_op",
    "saved_bytes_during",
]


@contextlib.contextmanager
def saved_bytes_during(record: dict[str, int]) -> Iterator[None]:
    """Count the bytes autograd saves for backward inside the block (unique storages).

    Every tensor packed by autograd is counted once by its storage (views of one storage share it; a
    saved input is counted, since keeping it alive is what saving costs).

    Args:
        record: receives ``bytes`` and ``tensors`` when the block ends.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    record["bytes"] = sum(seen.values())
    record["tensors"] = len(seen)


class CountingOp:
    """Wrap an attention op; count the visible score elements of every call from its shapes."""

    def __init__(self, op: Callable[..., Any]) -> None:
        self.op = op
        self.elements = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        q = kwargs["query"] if "query" in kwargs else args[0]
        k = kwargs["key"] if "key" in kwargs else args[1]
        self.elements += score_elements(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2], bool(kwargs["is_causal"])
        )
        self.calls += 1
        return self.op(*args, **kwargs)


class TimedTransport(ProcessGroupTransport):
    """cp_dtensor's process-group transport that also measures time blocked in communication.

    ``wait_seconds`` adds the time spent in every :meth:`Pending.wait` of point-to-point transfers and the
    whole duration of the (blocking) all-gather and reduce-scatter collectives; ``wait_by_kind`` splits it
    by message tag (``"tag<N>"``) and ``"collective"``.
    """

    def __init__(self, group: torch.distributed.ProcessGroup) -> None:
        super().__init__(group)
        self.wait_seconds = 0.0
        self.wait_by_kind: dict[str, float] = {}

    def _add(self, kind: str, seconds: float) -> None:
        self.wait_seconds += seconds
        self.wait_by_kind[kind] = self.wait_by_kind.get(kind, 0.0) + seconds

    def _timed(self, pending: Pending, kind: str) -> Pending:
        def wait() -> torch.Tensor | None:
            t0 = time.perf_counter()
            result = pending.wait()
            self._add(kind, time.perf_counter() - t0)
            return result

        return Pending(wait)

    def send_recv(self, send, recv_shape, dtype, device, tag):
        return self._timed(super().send_recv(send, recv_shape, dtype, device, tag), f"tag{tag}")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().all_gather(tensor)
        self._add("collective", time.perf_counter() - t0)
        return out

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().reduce_scatter(tensor)
        self._add("collective", time.perf_counter() - t0)
        return out


def functional_collective_op(name: str) -> Any:
    """The ``torch.ops._c10d_functional.<name>.default`` op (what PyTorch's ring rotaters dispatch)."""
    return getattr(torch.ops._c10d_functional, name).default


class CollectiveMeter(TorchDispatchMode):
    """Count bytes sent by, and time blocked in, PyTorch's functional collectives on this rank.

    Bytes: ``all_to_all_single`` sends its input splits addressed to other ranks; ``all_gather_into_tensor``
    is counted as a ring all-gather, (group_size - 1) x input bytes (the convention of cp_dtensor's
    ``AttentionStats``). Bytes go to ``bytes_by_phase[phase]``; set :attr:`phase` before each phase.
    Waits: the time in ``wait_tensor`` goes to ``wait_seconds``.
    """

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.phase = "forward"
        self.bytes_by_phase: dict[str, int] = {}
        self.calls_by_phase: dict[str, int] = {}
        self.wait_seconds = 0.0

    def _add(self, nbytes: int) -> None:
        self.bytes_by_phase[self.phase] = self.bytes_by_phase.get(self.phase, 0) + nbytes
        self.calls_by_phase[self.phase] = self.calls_by_phase.get(self.phase, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is functional_collective_op("all_to_all_single"):
            x, _out_splits, in_splits = args[0], args[1], args[2]
            row_bytes = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
            sent_rows = sum(n for dst, n in enumerate(in_splits) if dst != self.rank)
            self._add(sent_rows * row_bytes)
        elif func is functional_collective_op("all_gather_into_tensor"):
            x, group_size = args[0], args[1]
            self._add((group_size - 1) * x.numel() * x.element_size())
        elif func is functional_collective_op("wait_tensor"):
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            self.wait_seconds += time.perf_counter() - t0
            return out
        return func(*args, **kwargs)
