"""The one all-gather driver: gather the KV rows others need once, compute every piece, reduce-scatter dK/dV.

Note [All-gather plan]
~~~~~~~~~~~~~~~~~~~~~~
Every rank contributes the KV rows some other rank needs (all rows for the unmasked schedules; the plan's
``shared_rows`` for masks, padded to the largest count ``width``), one all-gather brings everyone's, and
the pieces run against one *buffer* assembled from them::

    unmasked (named layout): buffer = the gathered shards in natural order    pieces: Note [All-gather blocks]
                             [ 0 ..................................... S )      2 calls per local chunk
    masked:                  buffer = [ own S_local rows | src r-1's shared rows | src r-2's | ... ]
                                        step-0 pieces      the ring plan's pieces of each step, remapped

Backward gathers again (nothing but the local shards is saved), accumulates dK/dV over the buffer in fp32,
and reduce-scatters the gathered rows' part home: rank r receives the sum over ranks of the gradients of
its contributed rows (the buffer's own rows add directly). When no row has to cross ranks (``width`` 0:
documents kept whole, a window of 0) there is no collective at all - every rank knows, since the plan is
global. The same pieces as the ring, so the same work; the bytes are an all-gather's instead of a ring's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from cp_dtensor.attention.kernels import AttentionKernel
from cp_dtensor.attention.merge import accumulation_dtype, merge_block_
from cp_dtensor.attention.packing import packed_backward, packed_forward, pieces_packing
from cp_dtensor.attention.plan import (
    Piece,
    RingPlan,
    buffer_slice,
    count_piece,
    piece_backward,
    piece_forward,
)
from cp_dtensor.attention.schedule import build_gather_pieces
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.transport import Transport, pack_kv
from cp_dtensor.layout import layout_chunk_ids, seq_len_multiple

__all__ = ["AllGatherPlan", "allgather_backward", "allgather_forward", "build_allgather_plan"]


@dataclass(frozen=True, eq=False)
class AllGatherPlan:
    """One rank's all-gather (Note [All-gather plan]).

    Attributes:
        rank, cp, s_local: this rank, the CP size, the local sequence length.
        send_rows: local rows this rank contributes (None: all).
        width: rows per rank in the gathered tensor (the largest contribution; 0: nothing is gathered).
        own_rows: whether the buffer starts with this rank's own S_local rows.
        segments: the rest of the buffer, in order: ``(src, start, length)`` runs of src's gathered rows.
        covers_all: whether the segments hold every gathered row once (the unmasked case).
        pieces: the kernel calls, kv rows in buffer coordinates.
        cache: the packing of ``pieces`` per batch size and device (Note [Piece packing]).
    """

    rank: int
    cp: int
    s_local: int
    send_rows: torch.Tensor | None
    width: int
    own_rows: bool
    segments: tuple[tuple[int, int, int], ...]
    covers_all: bool
    pieces: tuple[Piece, ...]
    cache: dict = field(default_factory=dict, repr=False)


def build_allgather_plan(
    ring: RingPlan | None,
    *,
    rank: int,
    cp: int,
    s_local: int,
    layout: str | None = None,
    is_causal: bool = True,
) -> AllGatherPlan:
    """The all-gather plan from a masked ring plan (``ring``), or for an unmasked named ``layout``.

    Memoized (a plan is a pure function of its arguments, and keeps its packing, Note [Piece packing]):
    in the ring plan's cache, or per (rank, cp, s_local, layout, is_causal) for the unmasked plans.
    """
    if ring is None:
        assert layout is not None
        return _unmasked_allgather_plan(rank, cp, s_local, layout, is_causal)
    plan = ring.cache.get("allgather")
    if plan is None:
        plan = ring.cache["allgather"] = _masked_allgather_plan(ring, rank, cp, s_local)
    return plan


@functools.lru_cache(maxsize=256)
def _unmasked_allgather_plan(rank: int, cp: int, s_local: int, layout: str, is_causal: bool) -> AllGatherPlan:
    n_chunks = seq_len_multiple(cp, layout)
    chunk = s_local * cp // n_chunks
    owner = {c: (r, j) for r in range(cp) for j, c in enumerate(layout_chunk_ids(r, cp, layout))}
    segments = tuple((owner[c][0], owner[c][1] * chunk, chunk) for c in range(n_chunks))  # natural order
    pieces = build_gather_pieces(rank, cp, layout, is_causal, s_local)
    return AllGatherPlan(rank, cp, s_local, None, s_local, False, segments, True, pieces)


def _masked_allgather_plan(ring: RingPlan, rank: int, cp: int, s_local: int) -> AllGatherPlan:
    shared = [rows if rows is not None else torch.arange(s_local) for rows in ring.shared_rows]
    width = max(rows.numel() for rows in shared)
    runs, pieces, offset = [], list(ring.pieces[0]), s_local
    for step in range(1, cp):
        src = (rank - step) % cp
        rows = shared[src]
        if rows.numel():
            runs.append((src, 0, rows.numel()))
        for p in ring.pieces[step]:
            at = buffer_slice(rows, p.kv)
            pieces.append(Piece(p.batch, p.q, slice(offset + at.start, offset + at.stop), p.kind))
        offset += rows.numel()
    return AllGatherPlan(rank, cp, s_local, shared[rank], width, True, tuple(runs), False, tuple(pieces))


def _gather(k: torch.Tensor, v: torch.Tensor, transport: Transport, plan: AllGatherPlan) -> torch.Tensor:
    """(2, B, Hkv, buffer rows, D): the buffer of Note [All-gather plan]."""
    own = pack_kv(k, v)  # (2, B, Hkv, S_local, D)
    if plan.width == 0:
        return own
    if plan.send_rows is None:
        mine = own
    else:
        mine = own.new_zeros((*own.shape[:3], plan.width, own.shape[4]))
        mine[:, :, :, : plan.send_rows.numel()] = own.index_select(3, plan.send_rows)
    gathered = transport.all_gather(mine)  # (cp, 2, B, Hkv, width, D)
    parts = [own] if plan.own_rows else []
    parts += [gathered[src][:, :, :, start : start + n] for src, start, n in plan.segments]
    return torch.cat(parts, dim=3)  # one copy


def allgather_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    transport: Transport,
    *,
    plan: AllGatherPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: AttentionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather forward: gather the needed KV rows once, compute every piece, merge in fp32."""
    acc_dtype = accumulation_dtype(q.dtype)
    out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # (B, Hq, S_local, D)
    lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)  # (B, Hq, S_local)
    kv = _gather(k, v, transport, plan)  # (2, B, Hkv, buffer rows, D)
    packed = pieces_packing(plan.cache, plan.pieces, q.shape[0], q.device) if kernel.pack_pieces else None
    if packed is not None:  # Note [Piece packing]
        packed_forward(kernel, q, kv[0], kv[1], packed, scale, out_acc, lse_acc, stats, fresh=True)
        return out_acc.to(q.dtype), lse_acc
    for piece in plan.pieces:
        out_blk, lse_blk = piece_forward(kernel, q, kv[0], kv[1], piece.kv, piece, scale)
        count_piece(stats, "forward", q, piece)
        merge_block_(out_acc[piece.batch, :, piece.q], lse_acc[piece.batch, :, piece.q], out_blk, lse_blk)
    return out_acc.to(q.dtype), lse_acc


def allgather_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    transport: Transport,
    *,
    plan: AllGatherPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: AttentionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather backward: re-gather, compute, reduce-scatter the gathered rows' dK/dV (fp32) home."""
    acc_dtype = accumulation_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kv = _gather(k, v, transport, plan)
    dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)  # (2, B, Hkv, buffer rows, D)
    packed = pieces_packing(plan.cache, plan.pieces, q.shape[0], q.device) if kernel.pack_pieces else None
    if packed is not None:  # Note [Piece packing]: kv rows and dK/dV rows are both the buffer's
        for grad in packed_backward(kernel, dout, q, kv[0], kv[1], out, lse, packed, scale, dq_acc, stats):
            grad.add_into(dkv[0], dkv[1])
    for piece in plan.pieces if packed is None else ():
        dq, dk, dv = piece_backward(kernel, dout, q, kv[0], kv[1], piece.kv, out, lse, piece, scale)
        count_piece(stats, "backward", q, piece)
        dq_acc[piece.batch, :, piece.q] += dq
        dkv[0][piece.batch, :, piece.kv] += dk
        dkv[1][piece.batch, :, piece.kv] += dv
    del kv
    s_local = plan.s_local
    own = dkv[:, :, :, :s_local] if plan.own_rows else None
    if plan.width:
        shape = (plan.cp, *dkv.shape[:3], plan.width, dkv.shape[4])  # (cp, 2, B, Hkv, width, D)
        contrib = dkv.new_empty(shape) if plan.covers_all else dkv.new_zeros(shape)
        at = s_local if plan.own_rows else 0
        for src, start, n in plan.segments:
            contrib[src][:, :, :, start : start + n] = dkv[:, :, :, at : at + n]
            at += n
        summed = transport.reduce_scatter(contrib)  # (2, B, Hkv, width, D): my contributed rows' gradients
        if own is None:
            own = summed
        else:
            rows = plan.send_rows
            assert rows is not None
            own = own.index_add(3, rows.to(own.device), summed[:, :, :, : rows.numel()])
    assert own is not None
    return dq_acc.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)
