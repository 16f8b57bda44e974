"""Transports: how the CP strategies move tensors between ranks (point to point, gather, scatter, all-to-all).

Two transports implement the same small interface - one point-to-point primitive, :meth:`Transport.send_recv`
(send to the next rank and / or receive from the previous one, as one batch), and three collectives:

* :class:`ProcessGroupTransport` - real ``torch.distributed`` point-to-point (``batch_isend_irecv``) and
  collectives over the CP process group (gloo on CPU, NCCL on CUDA).
* :class:`ThreadTransport` - in-memory mailboxes between threads of one process, so that one process can
  step through every rank's work of the very same ring code (see ``cp_dtensor.attention.simulate``).

Both count the bytes they send (``bytes_sent``); for the collectives they count what a ring algorithm
sends per rank, (size - 1) x the local shard, and for the all-to-all the (size - 1) slots that leave the
rank (the slot a rank addresses to itself never travels).

Both also split into the two sub-transports of the hybrid strategy (:meth:`Transport.split`, Note
[Hybrid subgroups]).

Note [Hybrid subgroups]
~~~~~~~~~~~~~~~~~~~~~~~
``split(k)`` cuts a group of size cp = k x m into groups of k consecutive ranks (the all-to-all groups) and
rings of the ranks at the same position in every group (the rings across groups)::

    cp = 6, k = 2:   a2a groups {0 1} {2 3} {4 5}      rings {0 2 4} {1 3 5}
    rank 3: inner = {2 3} (its rank there: 1), outer = {1 3 5} (its rank there: 1 = its group)

Process groups: each rank creates the two subgroups it belongs to, inner first and outer second, with
``dist.new_group(ranks, use_local_synchronization=True)``, once per (CP group ranks, k), cached for the
life of the process. Creation is collective among the members of each subgroup, so every rank of the CP
group must make its first call with a given k at the same time (the cross-rank call check guarantees that
the ranks agree on k); since every rank creates inner before outer, no two ranks wait on each other in a
cycle. Local synchronization is what lets the CP group be one of several (dp x cp): ranks outside the CP
group never have to join (plain ``new_group`` would need every rank of the world, in the same order).
k = cp (the plain all-to-all) and k = 1 (the plain ring) create nothing: one side is the CP group itself,
the other a one-rank transport. Threads: the hub keeps one sub-hub per subgroup, created on first use.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

if TYPE_CHECKING:
    from cp_dtensor.attention.stats import AttentionStats

__all__ = [
    "DKV_TAG",
    "KV_TAG",
    "Pending",
    "ProcessGroupTransport",
    "SendWindow",
    "ThreadHub",
    "ThreadTransport",
    "Transport",
    "pack_kv",
    "single_rank_transport",
    "timed_wait",
]

# Tags keep the KV stream and the dK/dV stream apart on transports that match messages by tag.
KV_TAG = 11
DKV_TAG = 12


class Pending:
    """A started transfer; :meth:`wait` completes it and returns the received tensor (or ``None``).

    ``device`` is where its tensors live (None: unknown / CPU), so waits can be timed the right way.
    """

    def __init__(
        self, wait_fn: Callable[[], torch.Tensor | None], device: torch.device | None = None
    ) -> None:
        self._wait_fn: Callable[[], torch.Tensor | None] | None = wait_fn
        self._result: torch.Tensor | None = None
        self.device = device

    def wait(self) -> torch.Tensor | None:
        """Block until the transfer is complete; return the received tensor, if any (idempotent)."""
        if self._wait_fn is not None:
            self._result = self._wait_fn()
            self._wait_fn = None
        return self._result


def pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V in one contiguous (2, B, Hkv, S_local, D) buffer: one message per ring step."""
    return torch.stack([k, v])


def timed_wait(pending: Pending | None, stats: AttentionStats | None) -> torch.Tensor | None:
    """Complete ``pending`` (None: nothing to wait for), accounting the wait in ``stats`` if given."""
    if pending is None:
        return None
    if stats is None:
        return pending.wait()
    with stats.waiting(pending.device):
        return pending.wait()


class SendWindow:
    """At most two sends in flight: posting one waits for the one before it (double buffering).

    Note [Send window]
    ~~~~~~~~~~~~~~~~~~
    The ring's dK/dV accumulators are sent one per step; keeping every step's buffer alive until the end
    would make transient memory grow with the CP degree. A send posted at step s - 1 has had a whole step
    to complete, so waiting for it when step s posts its own costs nothing in the steady state::

        step:      1        2        3
        post:     a1  ->   a2  ->   a3         (post a_s waits for a_{s-1}; drain waits for the last)
        in flight: a1      a1 a2    a2 a3      at most two buffers alive
    """

    def __init__(self, wait: Callable[[Pending], object]) -> None:
        self._wait = wait
        self._pending: Pending | None = None

    def post(self, pending: Pending) -> None:
        """Track ``pending`` and complete the send posted before it."""
        previous, self._pending = self._pending, pending
        if previous is not None:
            self._wait(previous)

    def drain(self) -> None:
        """Complete the last send."""
        if self._pending is not None:
            self._wait(self._pending)
            self._pending = None


class Transport:
    """Interface of the transports: rank, size, point-to-point ring operations, collectives (all-gather,
    reduce-scatter, all-to-all) and the hybrid split into sub-transports."""

    rank: int
    size: int
    bytes_sent: int

    @property
    def next_rank(self) -> int:
        """The rank this one sends to."""
        return (self.rank + 1) % self.size

    @property
    def prev_rank(self) -> int:
        """The rank this one receives from."""
        return (self.rank - 1) % self.size

    def send_recv(
        self,
        send: torch.Tensor | None,
        recv_shape: tuple[int, ...] | None,
        dtype: torch.dtype,
        device: torch.device,
        tag: int,
    ) -> Pending:
        """Send ``send`` (if any) to the next rank and receive a ``recv_shape`` tensor (if any) from the
        previous one, in one batch: the masked ring's messages differ in size from hop to hop."""
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return ``(size, *tensor.shape)``: every rank's tensor, in rank order."""
        raise NotImplementedError

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        """Given ``(size, *shape)`` on every rank, return the sum over ranks of entry ``rank``."""
        raise NotImplementedError

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """Given ``(size, *shape)``, send entry j to rank j; return ``(size, *shape)``, entry i from rank i."""
        raise NotImplementedError

    def split(self, a2a_size: int) -> tuple[Transport, Transport]:
        """``(inner, outer)``: fresh transports (``bytes_sent`` 0) over this rank's group of ``a2a_size``
        consecutive ranks and over its ring across groups (Note [Hybrid subgroups])."""
        raise NotImplementedError


def single_rank_transport() -> Transport:
    """A transport of one rank: collectives return the input, nothing is ever sent."""
    return ThreadTransport(ThreadHub(1), 0)


def _check_split(size: int, a2a_size: int) -> None:
    if a2a_size < 1 or size % a2a_size:
        raise ValueError(f"a2a_size={a2a_size} must be a positive divisor of the group size {size}.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ProcessGroupTransport(Transport):
    """Ring transport over a ``torch.distributed`` process group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.bytes_sent = 0

    def _p2p(self, ops: list[dist.P2POp], result: torch.Tensor | None) -> Pending:
        works = dist.batch_isend_irecv(ops)

        def wait() -> torch.Tensor | None:
            for w in works:
                w.wait()
            return result

        return Pending(wait, ops[0].tensor.device)

    def send_recv(self, send, recv_shape, dtype, device, tag):
        ops, out = [], None
        if send is not None:
            send = send.contiguous()
            self.bytes_sent += _nbytes(send)
            ops.append(dist.P2POp(dist.isend, send, group=self.group, tag=tag, group_peer=self.next_rank))
        if recv_shape is not None:
            out = torch.empty(recv_shape, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, out, group=self.group, tag=tag, group_peer=self.prev_rank))
        if not ops:
            return Pending(lambda: None)
        return self._p2p(ops, out)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty(
            (self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
        )
        self.bytes_sent += (self.size - 1) * _nbytes(tensor)
        dist.all_gather_single(out, tensor, group=self.group)
        return out.view(self.size, *tensor.shape)

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty(tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        self.bytes_sent += (self.size - 1) * _nbytes(out)
        dist.reduce_scatter_single(out, tensor.view(-1, *tensor.shape[2:]), group=self.group)
        return out

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty_like(tensor)
        self.bytes_sent += (self.size - 1) * _nbytes(tensor[0])
        dist.all_to_all_single(out, tensor, group=self.group)
        return out

    def split(self, a2a_size: int) -> tuple[Transport, Transport]:
        _check_split(self.size, a2a_size)
        if a2a_size == self.size:
            return ProcessGroupTransport(self.group), single_rank_transport()
        if a2a_size == 1:
            return single_rank_transport(), ProcessGroupTransport(self.group)
        inner, outer = _hybrid_subgroups(self.group, self.rank, a2a_size)
        return ProcessGroupTransport(inner), ProcessGroupTransport(outer)


# Subgroups per (global ranks of the CP group in group order, a2a_size), and every subgroup per its member
# ranks (in group-rank order: two CP groups may need the same one, and a group of given members can be
# created only once). Creating a group is collective and slow, so each is made once per process (Note
# [Hybrid subgroups]). Caches of facts, never options.
_SUBGROUPS: dict[tuple[tuple[int, ...], int], tuple[ProcessGroup, ProcessGroup]] = {}
_GROUPS_BY_MEMBERS: dict[tuple[int, ...], ProcessGroup] = {}
_SUBGROUPS_LOCK = threading.Lock()


def _hybrid_subgroups(group: ProcessGroup, rank: int, a2a_size: int) -> tuple[ProcessGroup, ProcessGroup]:
    """This rank's all-to-all group and ring across groups, created on first use (Note [Hybrid subgroups])."""
    ranks = tuple(dist.get_process_group_ranks(group))  # global ranks, in group-rank order
    key = (ranks, a2a_size)
    with _SUBGROUPS_LOCK:
        if key not in _SUBGROUPS:
            index, position = divmod(rank, a2a_size)
            made = []
            for members in (ranks[index * a2a_size : (index + 1) * a2a_size], ranks[position::a2a_size]):
                if members not in _GROUPS_BY_MEMBERS:
                    sub = dist.new_group(list(members), use_local_synchronization=True, sort_ranks=False)
                    assert isinstance(sub, ProcessGroup)
                    _GROUPS_BY_MEMBERS[members] = sub
                made.append(_GROUPS_BY_MEMBERS[members])
            _SUBGROUPS[key] = (made[0], made[1])
        return _SUBGROUPS[key]


class ThreadHub:
    """Shared mailboxes and a barrier for :class:`ThreadTransport` ranks living in one process."""

    def __init__(self, size: int, timeout_s: float = 300.0) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._boxes: dict[tuple[int, int, int], queue.Queue] = {}
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(size)
        self._slots: list[torch.Tensor | None] = [None] * size
        self._subs: dict[tuple, ThreadHub] = {}

    def box(self, src: int, dst: int, tag: int) -> queue.Queue:
        """The FIFO mailbox of messages from ``src`` to ``dst`` with ``tag``."""
        with self._lock:
            return self._boxes.setdefault((src, dst, tag), queue.Queue())

    def abort(self) -> None:
        """Release every rank blocked on the barrier (after another rank failed), sub-hubs included."""
        self._barrier.abort()
        with self._lock:
            subs = list(self._subs.values())
        for sub in subs:
            sub.abort()

    def sub_hub(self, key: tuple, size: int) -> ThreadHub:
        """The hub of the subgroup ``key`` (of ``size`` ranks), shared by the threads that ask for it."""
        with self._lock:
            sub = self._subs.get(key)
            if sub is None:
                sub = self._subs[key] = ThreadHub(size, self.timeout_s)
                if self._barrier.broken:
                    sub.abort()
            return sub

    def gather(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` in rank order (a collective of all ranks of the hub)."""
        self._slots[rank] = tensor
        self._barrier.wait(self.timeout_s)
        result = list(self._slots)
        self._barrier.wait(self.timeout_s)
        return result  # type: ignore[return-value]


class ThreadTransport(Transport):
    """Ring transport between threads of one process (for the single-process simulation)."""

    def __init__(self, hub: ThreadHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.size = hub.size
        self.bytes_sent = 0

    def _put(self, tensor: torch.Tensor, tag: int) -> None:
        self.bytes_sent += _nbytes(tensor)
        self.hub.box(self.rank, self.next_rank, tag).put(tensor.detach().clone())

    def _get(self, tag: int) -> torch.Tensor:
        try:
            return self.hub.box(self.prev_rank, self.rank, tag).get(timeout=self.hub.timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"simulated rank {self.rank} got no message from rank {self.prev_rank} (tag {tag}) "
                f"within {self.hub.timeout_s}s"
            ) from None

    def send_recv(self, send, recv_shape, dtype, device, tag):
        if send is not None:
            self._put(send, tag)
        if recv_shape is None:
            return Pending(lambda: None)
        return Pending(lambda: self._get(tag))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += (self.size - 1) * _nbytes(tensor)
        return torch.stack(self.hub.gather(self.rank, tensor.detach().clone()))

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += (self.size - 1) * _nbytes(tensor[0])
        parts = self.hub.gather(self.rank, tensor.detach().clone())
        out = parts[0][self.rank].clone()
        for p in parts[1:]:
            out += p[self.rank]
        return out

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_sent += (self.size - 1) * _nbytes(tensor[0])
        parts = self.hub.gather(self.rank, tensor.detach().clone())  # the sender may reuse its buffer
        return torch.stack([p[self.rank] for p in parts])

    def split(self, a2a_size: int) -> tuple[Transport, Transport]:
        _check_split(self.size, a2a_size)
        index, position = divmod(self.rank, a2a_size)
        inner = self.hub.sub_hub(("a2a", a2a_size, index), a2a_size)
        outer = self.hub.sub_hub(("ring", a2a_size, position), self.size // a2a_size)
        return ThreadTransport(inner, position), ThreadTransport(outer, index)
