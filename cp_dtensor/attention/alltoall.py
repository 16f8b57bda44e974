"""All-to-all (Ulysses) and hybrid CP attention: heads sharded inside groups, the ring across groups.

Note [Ulysses all-to-all]
~~~~~~~~~~~~~~~~~~~~~~~~~
Every rank holds a sequence shard of every head. One all-to-all turns that into every head group's whole
sequence on one rank; attention then runs locally over the full sequence, and a second all-to-all brings
the output back to sequence shards (CP = 4, Hq = 8, shards s0..s3 in layout order)::

    before (sequence-sharded)          after (head-sharded)                  back
    rank 0: s0 x heads 0..7    a2a     rank 0: heads 0,1 x [s0 s1 s2 s3]      out: a2a again ->
    rank 1: s1 x heads 0..7    -->     rank 1: heads 2,3 x [s0 s1 s2 s3]      rank r: s_r x heads 0..7
    ...                                ...     sorted into natural order (Note [All-to-all group order])

    send buffer of rank r: (cp, B, Hq/cp + 2 Hkv', S_local, D); slot j = [q heads of j | the K, V heads j
    uses]; one all-to-all_single carries q, k and v (each slot the same size, so the splits are even).

GQA/MQA: query head h uses KV head h // (Hq / Hkv), so rank j (query heads j Hq/cp ...) needs KV heads
``j Hkv // cp ...``: Hkv' = Hkv / cp of them when cp divides Hkv, else one (Hkv divides cp)::

    Hq = 8, Hkv = 2, cp = 4:  rank j computes q heads 2j, 2j+1, which use kv head j // 2
      kv head 0 -> ranks 0, 1      kv head 1 -> ranks 2, 3

A KV head travels only to the ranks that use it; it is never expanded to the query heads before sending
(the kernel takes GQA shapes). In backward the dK/dV a KV head gets from its several ranks are summed at
the owner of the sequence rows, in fp32 (fp64 for fp64); when every KV head has one user the gradients
travel in the input dtype (pure data movement). dQ always travels in the input dtype: each element has one
producer. The kernel's dQ/dK/dV are in the input dtype (the CPU flash kernel has no fp32 output), so for
bf16 each gradient is rounded once by the kernel, as on one process, and shared dK/dV once more after the
fp32 sum (tolerance in tests/test_alltoall.py).

Saved for backward: only the local q, k, v, out shards and the lse, which stays head-sharded
(B, Hq/cp, S), the same bytes as the local (B, Hq, S_local). Backward *re-communicates* instead of saving
the head-sharded full-sequence tensors: one all-to-all carries q, k, v, out and dout, the kernel backward
runs on the local heads, one more brings dq, dk, dv home. Bytes sent per rank (each term (cp - 1) / cp of
the local tensor; K, V: (cp - 1) slots of Hkv' heads)::

    forward:   q + k' + v'  ->      out  <-
    backward:  q + k' + v' + out + dout  ->      dq + dk' + dv'  <-

Note [Hybrid all-to-all x ring]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``comm="hybrid", a2a_size=k``: the CP group splits into cp / k groups of k consecutive ranks. Inside a
group the all-to-all above runs over k ranks (Hq / k heads per rank, the group's k sequence shards
gathered into one "super-shard"); across groups the ranks at the same position form rings of cp / k that
run the existing ring (or masked ring) on the super-shards, with a sub-transport (Note [Hybrid
subgroups])::

    CP = 4, k = 2:     group 0        group 1
                      [ r0   r1 ]    [ r2   r3 ]     all-to-all inside each group: Hq / 2 heads per rank
                        |    |         |    |
                        |    +---------|----+        ring {r1 r3}: heads Hq/2 .. Hq-1, super-shards G0, G1
                        +--------------+             ring {r0 r2}: heads 0 .. Hq/2-1,  super-shards G0, G1

The ring needs a layout of its cp / k super-shards. For zigzag, a group of consecutive ranks holds k
consecutive chunks from the front and their mirror from the back, i.e. exactly zigzag over cp / k with
chunks k times longer; contiguous stays contiguous::

    zigzag, cp 4 (8 chunks):  | c0 c1 | c2 c3 | c4 c5 | c6 c7 |    group 0 = r0 + r1: c0 c1 + c6 c7
                                G0      G1      G1      G0          = zigzag over 2 super-shards

so named layouts keep their name; a :class:`SequenceLayout` becomes one over cp / k super-shards whose
positions are the sorted union of each group's positions. Masks (documents, windows) are planned on that
layout by the masked ring as usual. ``comm="alltoall"`` is the case k = cp: one group, whose "ring" is one
rank: a one-rank ring plan, i.e. the kernel on the full natural-order sequence (or the masked pieces). k = 1 is the plain ring.

Note [All-to-all group order]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The all-to-all delivers the group's shards in rank order; each holds its positions in increasing order
but they interleave (zigzag, balanced layouts). The super-shard puts them in natural (increasing) order by
a few slice copies, one per *run* of consecutive positions of one member, computed once per layout::

    zigzag, cp 2 (one group):  received [ r0: c0 c3 | r1: c1 c2 ]
      runs: dst 0 <- r0 rows 0..n,  dst n <- r1 rows 0..2n,  dst 3n <- r0 rows n..2n     -> c0 c1 c2 c3

The same runs, reversed, cut the super-shard's out / dq / dk / dv back into per-member slots.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cp_dtensor.attention.merge import accumulation_dtype
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.transport import Transport
from cp_dtensor.layout import LayoutLike, SequenceLayout, sequence_positions

__all__ = [
    "AllToAllPlan",
    "GroupPlan",
    "HeadSplit",
    "Run",
    "alltoall_backward",
    "alltoall_forward",
    "build_group_plan",
    "head_split_problem",
    "heads_split",
]

if TYPE_CHECKING:
    from cp_dtensor.attention.strategy import Algorithm


def heads_split(hq: int, hkv: int, a2a_size: int) -> bool:
    """Whether ``a2a_size`` ranks can share ``hq`` query and ``hkv`` key/value heads (Note [Ulysses
    all-to-all]): the query heads divide evenly and each rank's KV heads are whole heads or one shared head."""
    return hq % a2a_size == 0 and (hkv % a2a_size == 0 or a2a_size % hkv == 0)


def head_split_problem(hq: int, hkv: int, a2a_size: int, comm: str, cp: int) -> str | None:
    """Why ``a2a_size`` ranks cannot share the heads (Note [Ulysses all-to-all]), or None when they can.

    Args:
        hq, hkv: query and key/value heads of this rank (after any tp split).
        a2a_size: ranks per all-to-all group (cp for ``comm="alltoall"``).
        comm: the strategy name, for the message.
        cp: the CP degree, for the message.
    """
    if heads_split(hq, hkv, a2a_size):
        return None
    what = f"the CP degree {cp}" if comm == "alltoall" else f"a2a_size={a2a_size} (CP degree {cp})"
    return (
        f"comm={comm!r} splits the heads over {a2a_size} ranks ({what}), but this rank has {hq} query heads "
        f"and {hkv} key/value heads: the query heads must be a multiple of {a2a_size}, and the key/value "
        f"heads must divide {a2a_size} or be a multiple of it (under tensor parallelism these are the heads "
        f"left on this rank after the tp split). Use comm='hybrid' with an a2a_size that fits both, or "
        f"comm='p2p'."
    )


@dataclass(frozen=True)
class HeadSplit:
    """Which heads each member of an all-to-all group computes (Note [Ulysses all-to-all]).

    Attributes:
        a2a_size: ranks in the group (k).
        hq: query heads of this rank before the split.
        hkv: key/value heads of this rank before the split.
    """

    a2a_size: int
    hq: int
    hkv: int

    @property
    def q_per_rank(self) -> int:
        """Query heads each member computes: Hq / k."""
        return self.hq // self.a2a_size

    @property
    def kv_per_rank(self) -> int:
        """Key/value heads each member needs: Hkv / k, or 1 when k is a multiple of Hkv."""
        return max(1, self.hkv // self.a2a_size)

    @property
    def shares_kv(self) -> bool:
        """Whether a KV head is used by several members (Hkv < k): its gradients are summed."""
        return self.hkv < self.a2a_size

    def kv_index(self, device: torch.device) -> torch.Tensor:
        """(k * kv_per_rank,) int64: the KV head of every slot, member by member (member j: ``j Hkv // k``...)."""
        first = torch.arange(self.a2a_size, device=device) * self.hkv // self.a2a_size
        return (first[:, None] + torch.arange(self.kv_per_rank, device=device)).flatten()

    def q_slots(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hq, S, D) -> (k, B, Hq / k, S, D) view: slot j = member j's query heads."""
        return x.unflatten(1, (self.a2a_size, self.q_per_rank)).transpose(0, 1)

    def kv_slots(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S, D) -> (k, B, kv_per_rank, S, D): slot j = the KV heads member j uses (copies when shared)."""
        if self.shares_kv:
            x = x.index_select(1, self.kv_index(x.device))  # (B, k, S, D): one KV head per member
        return x.unflatten(1, (self.a2a_size, self.kv_per_rank)).transpose(0, 1)

    def q_from_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """(k, B, Hq / k, S, D), slot j = heads of member j -> (B, Hq, S, D)."""
        return slots.transpose(0, 1).flatten(1, 2)

    def kv_from_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """(k, B, kv_per_rank, S, D) -> (B, Hkv, S, D), summing the slots of a shared KV head (in their dtype)."""
        heads = slots.transpose(0, 1).flatten(1, 2)  # (B, k * kv_per_rank, S, D)
        if not self.shares_kv:
            return heads  # slot order is head order
        out = heads.new_zeros((heads.shape[0], self.hkv, *heads.shape[2:]))
        return out.index_add_(1, self.kv_index(heads.device), heads)


@dataclass(frozen=True)
class Run:
    """``length`` consecutive rows: super-shard rows ``dst...`` <-> rows ``src...`` of member ``member``."""

    dst: int
    member: int
    src: int
    length: int


@dataclass(frozen=True, eq=False)
class GroupPlan:
    """Where this rank sits in the hybrid split, and how its group's shards interleave.

    Attributes:
        a2a_size: ranks per all-to-all group (k).
        index: this rank's group, which is also its rank in the ring across groups.
        n_groups: cp / k, the size of the ring across groups.
        s_local: the local sequence length of one member.
        runs: per batch-row selection (all rows for named layouts, one row each for layout objects), the
            copies between received slots and the super-shard (Note [All-to-all group order]).
        ring_layout: the layout of the cp / k super-shards for the ring across groups.
    """

    a2a_size: int
    index: int
    n_groups: int
    s_local: int
    runs: tuple[tuple[slice, tuple[Run, ...]], ...]
    ring_layout: LayoutLike

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """(k, B, H, S_local, D) received slots (member order) -> (B, H, k S_local, D) in natural order."""
        k, b, h, s_local, d = slots.shape
        out = slots.new_empty((b, h, k * s_local, d))
        for rows, runs in self.runs:
            for r in runs:
                out[rows, :, r.dst : r.dst + r.length] = slots[r.member, rows, :, r.src : r.src + r.length]
        return out

    def scatter(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, H, k S_local, D) super-shard -> (k, B, H, S_local, D) slots, member j's rows in slot j."""
        b, h, _, d = x.shape
        out = x.new_empty((self.a2a_size, b, h, self.s_local, d), dtype=dtype or x.dtype)
        for rows, runs in self.runs:
            for r in runs:
                out[r.member, rows, :, r.src : r.src + r.length] = x[rows, :, r.dst : r.dst + r.length]
        return out


def _runs(order: torch.Tensor, s_local: int) -> tuple[Run, ...]:
    """Runs of the permutation ``order`` (super-shard row -> slot of the member-concatenated buffer)."""
    member, src = order // s_local, order % s_local
    start = torch.ones(order.numel(), dtype=torch.bool)
    start[1:] = (member[1:] != member[:-1]) | (src[1:] != src[:-1] + 1)
    starts = torch.nonzero(start).flatten().tolist()
    stops = [*starts[1:], order.numel()]
    m, s = member.tolist(), src.tolist()
    return tuple(Run(a, m[a], s[a], z - a) for a, z in zip(starts, stops))


# Group plans per (layout, cp, a2a_size, group, seq_len): every layer of a step makes the same call, so the
# runs are computed once per batch. A cache of facts (it never changes a result), bounded; the simulation's
# threads share it, hence the lock.
_GROUP_PLANS: OrderedDict[tuple, GroupPlan] = OrderedDict()
_GROUP_PLANS_LOCK = threading.Lock()
_MAX_GROUP_PLANS = 16


def build_group_plan(layout: LayoutLike, cp: int, a2a_size: int, rank: int, seq_len: int) -> GroupPlan:
    """The :class:`GroupPlan` of ``rank`` for groups of ``a2a_size`` ranks (Note [Hybrid all-to-all x ring]).

    Args:
        layout: the layout of the CP shards (name or :class:`SequenceLayout`).
        cp: the CP degree; a multiple of ``a2a_size``.
        a2a_size: ranks per all-to-all group.
        rank: this rank in the CP group.
        seq_len: the global sequence length.
    """
    key = (layout, cp, a2a_size, rank // a2a_size, seq_len)
    with _GROUP_PLANS_LOCK:
        plan = _GROUP_PLANS.get(key)
        if plan is not None:
            _GROUP_PLANS.move_to_end(key)
            return plan
    plan = _build_group_plan(layout, cp, a2a_size, rank // a2a_size, seq_len)
    with _GROUP_PLANS_LOCK:
        _GROUP_PLANS[key] = plan
        if len(_GROUP_PLANS) > _MAX_GROUP_PLANS:
            _GROUP_PLANS.popitem(last=False)
    return plan


def _group_positions(layout: LayoutLike, cp: int, a2a_size: int, group: int, seq_len: int) -> torch.Tensor:
    """(1 or B, k S_local): global positions of the group's members' rows, member after member."""
    members = range(group * a2a_size, (group + 1) * a2a_size)
    pos = torch.cat([sequence_positions(seq_len, r, cp, layout) for r in members], dim=-1)
    return pos if pos.dim() == 2 else pos.unsqueeze(0)


def _ring_layout(layout: LayoutLike, cp: int, a2a_size: int, seq_len: int) -> LayoutLike:
    """The layout of the cp / k super-shards (Note [Hybrid all-to-all x ring])."""
    n_groups = cp // a2a_size
    if n_groups == 1:
        return "contiguous"  # one super-shard: the whole sequence in natural order
    if isinstance(layout, str):
        return layout  # consecutive ranks of zigzag / contiguous form zigzag / contiguous super-shards
    groups = [_group_positions(layout, cp, a2a_size, g, seq_len) for g in range(n_groups)]
    positions = torch.cat([g.sort(dim=1).values for g in groups], dim=1)  # (B, S)
    return SequenceLayout(positions, n_groups, name=f"{layout.name}/a2a{a2a_size}")


def _build_group_plan(layout: LayoutLike, cp: int, a2a_size: int, group: int, seq_len: int) -> GroupPlan:
    s_local = seq_len // cp
    pos = _group_positions(layout, cp, a2a_size, group, seq_len)  # (1 or B, k S_local)
    per_row = isinstance(layout, SequenceLayout)
    runs = tuple(
        (slice(b, b + 1) if per_row else slice(None), _runs(pos[b].argsort(), s_local))
        for b in range(pos.shape[0])
    )
    ring_layout = _ring_layout(layout, cp, a2a_size, seq_len)
    n_groups = cp // a2a_size
    if isinstance(ring_layout, str):  # the claim of the Note, checked once per plan
        want = sequence_positions(seq_len, group, n_groups, ring_layout)
        assert torch.equal(pos[0].sort().values, want), (layout, cp, a2a_size, group)
    return GroupPlan(a2a_size, group, n_groups, s_local, runs, ring_layout)


@dataclass(frozen=True, eq=False)
class AllToAllPlan:
    """One call's all-to-all / hybrid algorithm: the group plan and the ring across groups.

    Attributes:
        group: this rank's :class:`GroupPlan`.
        ring: the ring (masked or not) over the cp / k super-shards of ``group.ring_layout``; for one group
            (``comm="alltoall"``) a one-rank ring: the kernel on the whole sequence.
    """

    group: GroupPlan
    ring: Algorithm


def _all_to_all(
    transport: Transport, slots: Sequence[torch.Tensor], stats: AttentionStats | None
) -> list[torch.Tensor]:
    """Exchange ``slots`` (each (k, B, h_i, S_local, D)), one all-to-all per dtype; the received parts."""
    received: list[torch.Tensor | None] = [None] * len(slots)
    for dtype in dict.fromkeys(t.dtype for t in slots):
        idx = [i for i, t in enumerate(slots) if t.dtype == dtype]
        send = slots[idx[0]] if len(idx) == 1 else torch.cat([slots[i] for i in idx], dim=2)
        with stats.waiting(send.device) if stats is not None else contextlib.nullcontext():
            recv = transport.all_to_all(send)  # (k, B, sum h_i, S_local, D), slot i from member i
        del send
        for i, part in zip(idx, recv.split([slots[i].shape[2] for i in idx], dim=2)):
            received[i] = part
    return received  # type: ignore[return-value]


def alltoall_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    transport: Transport,
    *,
    plan: AllToAllPlan,
    stats: AttentionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-to-all / hybrid forward on local shards (Notes [Ulysses all-to-all], [Hybrid all-to-all x ring]).

    Returns:
        ``out`` (B, Hq, S_local, D) in q's dtype, and the fp32 ``lse`` of this rank's heads over its
        group's super-shard (B, Hq / k, k S_local), as many elements as the local (B, Hq, S_local) and
        shaped so (opaque to the caller; the backward reshapes it back).
    """
    group = plan.group
    inner, outer = transport.split(group.a2a_size)
    heads = HeadSplit(group.a2a_size, q.shape[1], k.shape[1])
    received = _all_to_all(inner, [heads.q_slots(q), heads.kv_slots(k), heads.kv_slots(v)], stats)
    q_h, k_h, v_h = (group.gather(t) for t in received)  # (B, Hq/k, kS, D), (B, Hkv', kS, D) x 2
    del received
    out_h, lse_h = plan.ring.forward(q_h, k_h, v_h, outer, stats=stats, **plan.ring.options)
    del q_h, k_h, v_h
    (out_slots,) = _all_to_all(inner, [group.scatter(out_h)], stats)  # (k, B, Hq/k, S_local, D)
    transport.bytes_sent += inner.bytes_sent + outer.bytes_sent
    return heads.q_from_slots(out_slots), lse_h.reshape(q.shape[:3])  # same elements, shaped like the op's


def alltoall_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    transport: Transport,
    *,
    plan: AllToAllPlan,
    stats: AttentionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-to-all / hybrid backward: re-send q, k, v, out with dout, run the ring backward, send dq/dk/dv home."""
    group = plan.group
    inner, outer = transport.split(group.a2a_size)
    heads = HeadSplit(group.a2a_size, q.shape[1], k.shape[1])
    slots = [heads.q_slots(t) for t in (q, out, dout)] + [heads.kv_slots(t) for t in (k, v)]
    received = _all_to_all(inner, slots, stats)
    del slots
    q_h, out_h, dout_h, k_h, v_h = (group.gather(t) for t in received)  # (B, Hq/k | Hkv', kS, D)
    del received
    lse_h = lse.reshape(q_h.shape[:3])  # (B, Hq / k, k S_local): what the forward's ring returned
    dq_h, dk_h, dv_h = plan.ring.backward(
        dout_h, q_h, k_h, v_h, out_h, lse_h, outer, stats=stats, **plan.ring.options
    )
    del q_h, out_h, dout_h, k_h, v_h
    # A shared KV head gets several members' dK/dV: they travel and are summed in fp32 (fp64 for fp64).
    kv_dtype = accumulation_dtype(k.dtype) if heads.shares_kv else k.dtype
    dq_s, dk_s, dv_s = _all_to_all(
        inner, [group.scatter(dq_h), group.scatter(dk_h, kv_dtype), group.scatter(dv_h, kv_dtype)], stats
    )
    transport.bytes_sent += inner.bytes_sent + outer.bytes_sent
    return (
        heads.q_from_slots(dq_s),
        heads.kv_from_slots(dk_s).to(k.dtype),
        heads.kv_from_slots(dv_s).to(v.dtype),
    )
