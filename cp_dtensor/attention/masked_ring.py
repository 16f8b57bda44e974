"""The masked CP attention op: documents and sliding windows, ring (p2p) and all-gather, fwd and bwd.

Note [Masked ring]
~~~~~~~~~~~~~~~~~~
The same ring as Note [Ring attention, forward and backward], driven by a :class:`MaskedPlan` instead of
the zigzag block table::

    step s (rank r holds rows held[s] of src = r - s's KV):
      send  rows held[s + 1] of the held buffer -> r + 1      (only what someone further along needs;
      recv  held[s + 1] rows of src - 1's KV    <- r - 1       nothing at all when no one does)
      compute the plan's pieces for (r, src): FULL / LOWER / UPPER kernel calls, visible pairs only
      merge each piece's (out, lse) into fp32 accumulators at its query rows   (Note [LSE merge])

Backward: KV travel again; src's fp32 dK/dV accumulator holds only the rows added so far (acc[s]),
grows by this rank's rows, and goes home after cp - 1 hops, as in the unmasked ring. UPPER pieces run
the causal kernel on row-reversed q, k, v (and dout, out, lse), then reverse the results back.

All-gather variant: every rank contributes its rows that any other rank needs (``shared_rows``, padded
to the largest count), computes all pieces against the gathered rows, and reduce-scatters the dK/dV of
those rows back to their owners in fp32.

Only local q, k, v, out and lse are saved for backward; the plan is rebuilt from the cache.
"""

from __future__ import annotations

import torch

from cp_dtensor.attention.comm import (
    DKV_TAG,
    KV_TAG,
    Pending,
    RingStats,
    SendWindow,
    Transport,
    pack_kv,
    timed_wait,
)
from cp_dtensor.attention.kernels import AttentionKernel
from cp_dtensor.attention.mask_schedule import MaskedPlan, Piece, PieceKind, buffer_slice
from cp_dtensor.attention.merge import accumulation_dtype, merge_block_

__all__ = [
    "masked_allgather_backward",
    "masked_allgather_forward",
    "masked_ring_backward",
    "masked_ring_forward",
]


def _count(stats: RingStats | None, phase: str, q: torch.Tensor, piece: Piece) -> None:
    if stats is not None:
        stats.count(phase, piece.score_elements(q.shape[0]) * q.shape[1])  # rows x heads x visible pairs


_wait = timed_wait


def _piece_forward(
    kernel: AttentionKernel, q: torch.Tensor, kv: torch.Tensor, kv_rows: slice, piece: Piece, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    qp = q[piece.batch, :, piece.q]  # (b, Hq, nq, D)
    kp, vp = kv[0][piece.batch, :, kv_rows], kv[1][piece.batch, :, kv_rows]  # (b, Hkv, nk, D)
    if piece.kind is PieceKind.UPPER:
        out, lse = kernel.forward(qp.flip(2), kp.flip(2), vp.flip(2), is_causal=True, scale=scale)
        return out.flip(2), lse.flip(-1)
    return kernel.forward(qp, kp, vp, is_causal=piece.kind is PieceKind.LOWER, scale=scale)


def _piece_backward(
    kernel: AttentionKernel,
    dout: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_rows: slice,
    out: torch.Tensor,
    lse: torch.Tensor,
    piece: Piece,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, r = piece.batch, piece.q
    args = [dout[b, :, r], q[b, :, r], kv[0][b, :, kv_rows], kv[1][b, :, kv_rows], out[b, :, r]]
    if piece.kind is PieceKind.UPPER:
        flipped = [t.flip(2) for t in args]
        dq, dk, dv = kernel.backward(*flipped, lse[b, :, r].flip(-1), is_causal=True, scale=scale)
        return dq.flip(2), dk.flip(2), dv.flip(2)
    return kernel.backward(*args, lse[b, :, r], is_causal=piece.kind is PieceKind.LOWER, scale=scale)


def _kv_exchange(transport: Transport, plan: MaskedPlan, kv: torch.Tensor, step: int) -> Pending | None:
    """Post step ``step``'s KV message: forward what later ranks need, receive the next held buffer."""
    if step >= plan.cp - 1:
        return None
    index = plan.send_index[step]
    outgoing = kv.index_select(3, index) if index.numel() else None  # (2, B, Hkv, n_out, D)
    n_in = plan.held_rows[step + 1].numel()
    shape = (*kv.shape[:3], n_in, kv.shape[4]) if n_in else None
    return transport.send_recv(outgoing, shape, kv.dtype, kv.device, KV_TAG)


def masked_ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    transport: Transport,
    *,
    plan: MaskedPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked ring forward on local shards; returns ``out`` (q's dtype) and fp32 ``lse`` (B, Hq, S_local)."""
    acc_dtype = accumulation_dtype(q.dtype)
    out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # (B, Hq, S_local, D)
    lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)  # (B, Hq, S_local)
    kv: torch.Tensor | None = pack_kv(k, v)
    for step in range(plan.cp):
        pending = (
            _kv_exchange(transport, plan, kv, step)
            if kv is not None
            else _empty_exchange(transport, plan, q, k, step)
        )
        for piece in plan.pieces[step]:
            assert kv is not None
            rows = buffer_slice(plan.held_rows[step], piece.kv)
            out_blk, lse_blk = _piece_forward(kernel, q, kv, rows, piece, scale)
            _count(stats, "forward", q, piece)
            merge_block_(out_acc[piece.batch, :, piece.q], lse_acc[piece.batch, :, piece.q], out_blk, lse_blk)
        if step < plan.cp - 1:
            kv = _wait(pending, stats)
    return out_acc.to(q.dtype), lse_acc


def _empty_exchange(
    transport: Transport, plan: MaskedPlan, q: torch.Tensor, k: torch.Tensor, step: int
) -> Pending | None:
    """The KV exchange of a step at which this rank holds nothing: receive only."""
    if step >= plan.cp - 1:
        return None
    n_in = plan.held_rows[step + 1].numel()
    shape = (2, k.shape[0], k.shape[1], n_in, k.shape[3]) if n_in else None
    return transport.send_recv(None, shape, k.dtype, k.device, KV_TAG)


def masked_ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    transport: Transport,
    *,
    plan: MaskedPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked ring backward: KV rotate again, fp32 dK/dV accumulators of the needed rows travel home."""
    acc_dtype = accumulation_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # (B, Hq, S_local, D)
    kv: torch.Tensor | None = pack_kv(k, v)
    dkv_own = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)  # (2, B, Hkv, S_local, D)
    acc_shape = (2, *k.shape[:2])
    sends = SendWindow(lambda p: _wait(p, stats))
    for step in range(plan.cp):
        # Order as in the unmasked ring: accumulator recv, then the KV exchange.
        acc_in = None
        if step >= 2 and plan.acc_in_rows[step].numel():
            shape = (*acc_shape, plan.acc_in_rows[step].numel(), k.shape[3])
            acc_in = transport.send_recv(None, shape, acc_dtype, q.device, DKV_TAG)
        pending_kv = (
            _kv_exchange(transport, plan, kv, step)
            if kv is not None
            else _empty_exchange(transport, plan, q, k, step)
        )
        sends.drain()  # the previous step's dK/dV buffer is free before this step computes
        grads = []
        for piece in plan.pieces[step]:
            assert kv is not None
            rows = buffer_slice(plan.held_rows[step], piece.kv)
            dq, dk, dv = _piece_backward(kernel, dout, q, kv, rows, out, lse, piece, scale)
            _count(stats, "backward", q, piece)
            dq_acc[piece.batch, :, piece.q] += dq
            grads.append((piece, dk, dv))
        if step == 0:
            for piece, dk, dv in grads:
                dkv_own[0][piece.batch, :, piece.kv] += dk
                dkv_own[1][piece.batch, :, piece.kv] += dv
        else:
            rows_out = plan.acc_rows[step]
            received = _wait(acc_in, stats)
            if rows_out.numel():
                acc = torch.zeros(
                    (*acc_shape, rows_out.numel(), k.shape[3]), dtype=acc_dtype, device=q.device
                )
                if received is not None:
                    acc.index_copy_(3, torch.searchsorted(rows_out, plan.acc_in_rows[step]), received)
                for piece, dk, dv in grads:
                    at = buffer_slice(rows_out, piece.kv)
                    acc[0][piece.batch, :, at] += dk
                    acc[1][piece.batch, :, at] += dv
                sends.post(transport.send_recv(acc, None, acc_dtype, q.device, DKV_TAG))
        if step < plan.cp - 1:
            kv = _wait(pending_kv, stats)
    if plan.home_rows.numel():
        shape = (*acc_shape, plan.home_rows.numel(), k.shape[3])
        home = _wait(transport.send_recv(None, shape, acc_dtype, q.device, DKV_TAG), stats)
        assert home is not None
        dkv_own.index_add_(3, plan.home_rows, home)
    sends.drain()
    return dq_acc.to(q.dtype), dkv_own[0].to(k.dtype), dkv_own[1].to(v.dtype)


def _gather_shared(
    k: torch.Tensor, v: torch.Tensor, transport: Transport, plan: MaskedPlan
) -> list[torch.Tensor]:
    """Every rank's shared rows (those another rank needs), as (2, B, Hkv, n_src, D) per source rank."""
    width = max(rows.numel() for rows in plan.shared_rows)
    kv = pack_kv(k, v)
    mine = plan.shared_rows[plan.rank]
    padded = kv.new_zeros((*kv.shape[:3], width, kv.shape[4]))
    padded[:, :, :, : mine.numel()] = kv.index_select(3, mine)
    gathered = transport.all_gather(padded)  # (CP, 2, B, Hkv, width, D)
    return [gathered[src][:, :, :, : plan.shared_rows[src].numel()] for src in range(plan.cp)]


def _sources(plan: MaskedPlan) -> list[int]:
    return [(plan.rank - s) % plan.cp for s in range(plan.cp)]


def masked_allgather_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    transport: Transport,
    *,
    plan: MaskedPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked all-gather forward: gather the shared rows once, compute every piece, merge in fp32."""
    acc_dtype = accumulation_dtype(q.dtype)
    out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)
    shared = _gather_shared(k, v, transport, plan)
    own = pack_kv(k, v)
    for step, src in enumerate(_sources(plan)):
        kv, rows = (own, None) if step == 0 else (shared[src], plan.shared_rows[src])
        for piece in plan.pieces[step]:
            at = piece.kv if rows is None else buffer_slice(rows, piece.kv)
            out_blk, lse_blk = _piece_forward(kernel, q, kv, at, piece, scale)
            _count(stats, "forward", q, piece)
            merge_block_(out_acc[piece.batch, :, piece.q], lse_acc[piece.batch, :, piece.q], out_blk, lse_blk)
    return out_acc.to(q.dtype), lse_acc


def masked_allgather_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    transport: Transport,
    *,
    plan: MaskedPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked all-gather backward: re-gather the shared rows, reduce-scatter their dK/dV (fp32) home."""
    acc_dtype = accumulation_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    shared = _gather_shared(k, v, transport, plan)
    own = pack_kv(k, v)
    dkv_own = torch.zeros(own.shape, dtype=acc_dtype, device=q.device)  # (2, B, Hkv, S_local, D)
    width = max(rows.numel() for rows in plan.shared_rows)
    contrib = torch.zeros((plan.cp, *own.shape[:3], width, own.shape[4]), dtype=acc_dtype, device=q.device)
    for step, src in enumerate(_sources(plan)):
        kv, rows = (own, None) if step == 0 else (shared[src], plan.shared_rows[src])
        for piece in plan.pieces[step]:
            at = piece.kv if rows is None else buffer_slice(rows, piece.kv)
            dq, dk, dv = _piece_backward(kernel, dout, q, kv, at, out, lse, piece, scale)
            _count(stats, "backward", q, piece)
            dq_acc[piece.batch, :, piece.q] += dq
            target = dkv_own if rows is None else contrib[src]
            target[0][piece.batch, :, at] += dk
            target[1][piece.batch, :, at] += dv
    summed = transport.reduce_scatter(contrib)  # (2, B, Hkv, width, D): the others' dK/dV of my shared rows
    mine = plan.shared_rows[plan.rank]
    dkv_own.index_add_(3, mine, summed[:, :, :, : mine.numel()])
    return dq_acc.to(q.dtype), dkv_own[0].to(k.dtype), dkv_own[1].to(v.dtype)
