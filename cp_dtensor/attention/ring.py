"""The one ring driver: KV shards travel around the CP group while each rank computes its plan's pieces.

Note [Ring attention, forward and backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Forward (CP = 4, rank 1 shown; KV packed as one (2, B, Hkv, rows, D) buffer, double-buffered)::

    step:        0            1            2            3
    send KV:   kv1 -> r2    kv0 -> r2    kv3 -> r2    (none)
    compute:   q1 x kv1     q1 x kv0     q1 x kv3     q1 x kv2      (the plan's pieces, Note [Ring plan])
    merge:     (o, lse) <- lse-merge of each piece, fp32             (Note [LSE merge])

The transfer of the next KV is in flight while the current pieces are computed. Only q, k, v (local),
out and lse are saved for backward. What travels is the plan's: the whole buffer for the unmasked
schedules, only the rows someone further along needs for masked plans (nothing when no one does).

Backward: KV rotate again exactly as in forward. Each rank adds its dK/dV contribution for the KV it holds
into an fp32 accumulator that travels *with* that KV: the accumulator of kv_src starts at rank src+1, visits
src+2, ..., and after CP-1 hops arrives home at src, which adds its own contribution (computed at step 0).
That is a reduce-scatter of dK/dV done point to point: (CP-1) sends of KV and (CP-1) of dK/dV per rank,
the minimum. Sends and receives are posted in the same order on every rank, so transports that match
messages by order (NCCL) pair them correctly::

    rank r, step s >= 2:  recv acc(kv_src) <- r-1 | exchange KV | compute pieces | acc += dK,dV | send acc -> r+1

The previous step's accumulator send completes before a step computes (Note [Send window]), and every
step's kernel outputs are merged and dropped before the next kernel runs, so transient memory is flat in CP.
A one-rank plan (the all-to-all strategy's local step) runs the same loop without packing or messages.
"""

from __future__ import annotations

import torch

from cp_dtensor.attention.kernels import AttentionKernel
from cp_dtensor.attention.merge import accumulation_dtype, merge_block_
from cp_dtensor.attention.packing import PackedGrad, packed_backward, packed_forward, ring_packing
from cp_dtensor.attention.plan import (
    Piece,
    RingPlan,
    buffer_slice,
    count_piece,
    piece_backward,
    piece_forward,
)
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.transport import (
    DKV_TAG,
    KV_TAG,
    Pending,
    SendWindow,
    Transport,
    pack_kv,
    timed_wait,
)

__all__ = ["ring_backward", "ring_forward"]


def _exchange(
    transport: Transport, plan: RingPlan, kv: torch.Tensor | None, like: torch.Tensor, step: int
) -> Pending | None:
    """Post step ``step``'s KV message: forward what later ranks need, receive the next held buffer."""
    if step >= plan.cp - 1:
        return None
    outgoing = None
    if kv is not None:
        index = plan.send_index[step]
        if index is None:
            outgoing = kv
        elif index.numel():
            outgoing = kv.index_select(3, index)  # (2, B, Hkv, n_out, D)
    n_in = plan.rows_held(step + 1)
    shape = (2, *like.shape[:2], n_in, like.shape[3]) if n_in else None  # like: k (B, Hkv, S_local, D)
    return transport.send_recv(outgoing, shape, like.dtype, like.device, KV_TAG)


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    transport: Transport,
    *,
    plan: RingPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: AttentionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring forward on local shards; returns ``out`` (q's dtype) and fp32 ``lse`` (B, Hq, S_local)."""
    acc_dtype = accumulation_dtype(q.dtype)
    batch, s_local = q.shape[0], q.shape[2]
    out_acc: torch.Tensor | None = None  # (B, Hq, S_local, D)
    lse_acc: torch.Tensor | None = None  # (B, Hq, S_local)
    kv: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = pack_kv(k, v) if plan.cp > 1 else (k, v)
    packing = ring_packing(plan, batch, q.device) if kernel.pack_pieces else (None,) * plan.cp
    for step in range(plan.cp):
        pending = _exchange(transport, plan, kv, k, step)  # type: ignore[arg-type]
        if packing[step] is not None:  # one varlen call per mask class, Note [Piece packing]
            assert kv is not None
            fresh = out_acc is None
            if out_acc is None:
                out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
                lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)
            assert lse_acc is not None
            packed_forward(
                kernel, q, kv[0], kv[1], packing[step], scale, out_acc, lse_acc, stats, fresh=fresh
            )
        for piece in plan.pieces[step] if packing[step] is None else ():
            assert kv is not None
            rows = buffer_slice(plan.held_rows[step], piece.kv)
            out_blk, lse_blk = piece_forward(kernel, q, kv[0], kv[1], rows, piece, scale)
            count_piece(stats, "forward", q, piece)
            if out_acc is None and piece.covers(batch, s_local):  # fresh outputs become the accumulators
                out_acc = out_blk.to(acc_dtype)  # (no copy when already fp32)
                lse_acc = lse_blk.to(acc_dtype).contiguous()
                continue
            if out_acc is None:
                out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
                lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)
            assert lse_acc is not None
            merge_block_(out_acc[piece.batch, :, piece.q], lse_acc[piece.batch, :, piece.q], out_blk, lse_blk)
            del out_blk, lse_blk  # merged: not alive during the next kernel
        if pending is not None:
            kv = timed_wait(pending, stats)
    assert out_acc is not None and lse_acc is not None, "every query sees at least itself"
    return out_acc.to(q.dtype), lse_acc


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    transport: Transport,
    *,
    plan: RingPlan,
    scale: float,
    kernel: AttentionKernel,
    stats: AttentionStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ring backward: KV rotate again and the fp32 dK/dV accumulators travel home with them."""
    acc_dtype = accumulation_dtype(q.dtype)
    batch, s_local = q.shape[0], q.shape[2]
    kv: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = pack_kv(k, v) if plan.cp > 1 else (k, v)
    dq_acc: torch.Tensor | None = None  # (B, Hq, S_local, D)
    dk_own: torch.Tensor | None = None  # (B, Hkv, S_local, D): this rank's own dK, fp32
    dv_own: torch.Tensor | None = None
    acc_shape = (2, *k.shape[:2])
    sends = SendWindow(lambda p: timed_wait(p, stats))
    packing = ring_packing(plan, batch, q.device) if kernel.pack_pieces else (None,) * plan.cp
    for step in range(plan.cp):
        # Order matters for order-matched transports: accumulator recv, then the KV exchange (the Note).
        acc_in = None
        n_in = _rows(plan.acc_in_rows[step], s_local) if step >= 2 else 0
        if n_in:
            acc_in = transport.send_recv(None, (*acc_shape, n_in, k.shape[3]), acc_dtype, q.device, DKV_TAG)
        pending_kv = _exchange(transport, plan, kv, k, step)  # type: ignore[arg-type]
        sends.drain()  # the previous step's dK/dV buffer is free before this step computes
        grads: list[PieceGrads] = []
        packed = packing[step]
        if packed is not None:  # Note [Piece packing]
            assert kv is not None
            if dq_acc is None:
                dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
            grads += packed_backward(kernel, dout, q, kv[0], kv[1], out, lse, packed, scale, dq_acc, stats)
        for piece in plan.pieces[step] if packed is None else ():
            assert kv is not None
            rows = buffer_slice(plan.held_rows[step], piece.kv)
            dq, dk, dv = piece_backward(kernel, dout, q, kv[0], kv[1], rows, out, lse, piece, scale)
            count_piece(stats, "backward", q, piece)
            if dq_acc is None and piece.covers(batch, s_local):
                dq_acc = dq.to(acc_dtype)
            else:
                if dq_acc is None:
                    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
                dq_acc[piece.batch, :, piece.q] += dq
            grads.append((piece, dk, dv))
            del dq, dk, dv
        if step == 0:
            dk_own, dv_own = _own_accumulators(k, acc_dtype, grads, s_local)
        else:
            received = timed_wait(acc_in, stats)
            acc = _travelling_accumulator(plan, step, received, grads, acc_shape, k, acc_dtype)
            if acc is not None:
                sends.post(transport.send_recv(acc, None, acc_dtype, q.device, DKV_TAG))
            del acc, received
        del grads
        if pending_kv is not None:
            kv = timed_wait(pending_kv, stats)
    assert dq_acc is not None and dk_own is not None and dv_own is not None
    n_home = _rows(plan.home_rows, s_local) if plan.cp > 1 else 0
    if n_home:
        shape = (*acc_shape, n_home, k.shape[3])
        home = timed_wait(transport.send_recv(None, shape, acc_dtype, q.device, DKV_TAG), stats)
        assert home is not None
        if plan.home_rows is None:
            dk_own += home[0]
            dv_own += home[1]
        else:
            dk_own.index_add_(2, plan.home_rows, home[0])
            dv_own.index_add_(2, plan.home_rows, home[1])
    sends.drain()
    return dq_acc.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype)


def _rows(rows: torch.Tensor | None, s_local: int) -> int:
    return s_local if rows is None else rows.numel()


def _covers_kv(piece: Piece, batch: int, s_local: int) -> bool:
    return piece.batch.indices(batch) == (0, batch, 1) and piece.kv == slice(0, s_local)


PieceGrads = tuple[Piece, torch.Tensor, torch.Tensor] | PackedGrad
"""A step's dK/dV: one piece's (piece, dk, dv), or one packed call's (Note [Piece packing])."""


def _add_grads(
    dk_acc: torch.Tensor, dv_acc: torch.Tensor, grads: list[PieceGrads], rows: torch.Tensor | None
) -> None:
    """Add a step's dK/dV into (B, Hkv, n, D) accumulators holding the sorted local ``rows`` (None: all);
    a packed call's rows in them were fixed when its step was packed (``kv_acc_row``)."""
    for grad in grads:
        if isinstance(grad, PackedGrad):
            grad.add_into(dk_acc, dv_acc)
            continue
        piece, dk, dv = grad
        at = buffer_slice(rows, piece.kv)
        dk_acc[piece.batch, :, at] += dk
        dv_acc[piece.batch, :, at] += dv


def _own_accumulators(
    k: torch.Tensor, dtype: torch.dtype, grads: list[PieceGrads], s_local: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's own dK/dV (fp32) from its step-0 pieces: the one piece's gradients when it covers every
    KV row (one converting copy, none for fp32), else zeros plus each piece."""
    first = grads[0] if len(grads) == 1 else None
    if isinstance(first, tuple) and _covers_kv(first[0], k.shape[0], s_local):
        return first[1].to(dtype), first[2].to(dtype)
    dk_own = torch.zeros(k.shape, dtype=dtype, device=k.device)
    dv_own = torch.zeros(k.shape, dtype=dtype, device=k.device)
    _add_grads(dk_own, dv_own, grads, None)
    return dk_own, dv_own


def _travelling_accumulator(
    plan: RingPlan,
    step: int,
    received: torch.Tensor | None,
    grads: list[PieceGrads],
    acc_shape: tuple[int, ...],
    k: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """src's accumulator leaving this rank at ``step``: what arrived plus this rank's pieces (None: no
    rows to send). Rows are the plan's ``acc_rows[step]``; received rows ``acc_in_rows[step]``."""
    rows_out = plan.acc_rows[step]
    n_out = _rows(rows_out, plan.s_local)
    if not n_out:
        return None
    same_rows = received is not None and (rows_out is None or received.shape[3] == n_out)
    if same_rows:
        acc = received  # add in place: the received buffer travels on
    elif received is None and rows_out is None and len(grads) == 1 and _whole_batch(grads[0]):
        # the first hop of an all-rows accumulator: one block's dK/dV in its rows, zeros elsewhere
        piece, dk, dv = grads[0]  # type: ignore[misc]
        acc = torch.empty((*acc_shape, n_out, k.shape[3]), dtype=dtype, device=k.device)
        acc[:, :, :, : piece.kv.start].zero_()
        acc[:, :, :, piece.kv.stop :].zero_()
        acc[0][:, :, piece.kv].copy_(dk)
        acc[1][:, :, piece.kv].copy_(dv)
        return acc
    else:
        acc = torch.zeros((*acc_shape, n_out, k.shape[3]), dtype=dtype, device=k.device)
        if received is not None:
            assert rows_out is not None
            acc.index_copy_(3, torch.searchsorted(rows_out, plan.acc_in_rows[step]), received)
    assert acc is not None
    _add_grads(acc[0], acc[1], grads, rows_out)
    return acc


def _whole_batch(grad: PieceGrads) -> bool:
    return isinstance(grad, tuple) and grad[0].batch == slice(None)
