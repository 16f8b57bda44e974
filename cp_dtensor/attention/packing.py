"""Packing a ring step's pieces into varlen kernel calls: one per mask class instead of one per piece.

Note [Piece packing]
~~~~~~~~~~~~~~~~~~~~
A masked plan cuts a step into exact pieces (Note [Masked pieces]): at 128K tokens of ~400 documents and
cp 8 that is ~165 kernel calls on one rank at step 0, most of them small. Packing gathers the pieces of
one step into at most two *varlen* calls - every FULL piece in one non-causal call, every LOWER piece and
every UPPER piece (as LOWER on row-reversed rows, Note [Ring plan]) in one causal call::

    pieces of step s                      packed rows (flash-attn's varlen convention)
    P0 FULL   q 0:3   x kv 10:14          non-causal call: q rows [0 1 2 | 5 6]     kv rows [10..13 | 0 1]
    P1 LOWER  q 3:5   x kv 3:5                             cu_q [0 3 5]             cu_k [0 4 6]
    P2 FULL   q 5:7   x kv 0:2            causal call:     q rows [3 4 | 9 8 7]     kv rows [3 4 | 9 8 7]
    P3 UPPER  q 7:10  x kv 7:10                            cu_q [0 2 5]             cu_k [0 2 5]
                                                           (P3 reversed: UPPER = LOWER on flipped rows)

A :class:`PackedGroup` is one call: gather indices of the local query rows and of the held KV buffer rows
(batch row and row), cu_seqlens (int32) and the longest segment. A piece over several batch rows is one
segment per row. Forward gathers q / k / v rows with those indices, calls
:meth:`~cp_dtensor.attention.kernels.AttentionKernel.varlen_forward`, and merges the packed ``(out, lse)``
into the fp32 accumulators at once: a query row may sit in several segments of one step (FULL + LOWER of a
document cut by a window, UPPER + LOWER of a band tile), so the merge is the log-sum-exp merge of Note
[LSE merge] over all of a row's contributions together (``m`` = max of the row's lse values, weights
``exp(lse - m)``, an index_add per row) - the same sums as merging the pieces one by one, in another
order (rows in one segment each, going into fresh accumulators, are simply copied in). Backward gathers
dout / out / lse likewise, calls ``varlen_backward`` and scatter-adds (accumulating: rows repeat) dq into
the fp32 dq accumulator and dk / dv into the dK/dV accumulator of the step, whose rows (``kv_acc_row``) are
the plan's: all local rows for a rank's own KV, ``acc_rows[s]`` for a travelling accumulator, the buffer's
for the all-gather driver.

A step is packed only when that makes fewer calls (an unmasked step's one piece runs as before, bit for
bit). The packing is a pure function of (plan, batch size, device), built once and kept in the plan's
``cache`` (plans are cached per batch, Note [Plan cache]).

When to pack (``CPSettings.piece_packing``, :func:`apply_piece_packing`): ``"packed"`` is the opt-in for
CUDA flash (one varlen launch per class instead of hundreds; that path is written against torch 2.13's aten
ops but has not run on a GPU yet - tests/test_cuda_kernels.py and scripts/check_cuda.sh check it). ``"auto"``
keeps one call per piece everywhere until those checks have passed on a GPU (the per-piece path is the one
checked on GPUs), and on CPU for good: there the default varlen loop makes one dense call per distinct
segment shape, the kernels' time is the same either way, and the gathers and scatters of packing are pure
overhead (measured in docs/masked_attention.md, section 5). Results: equal to the per-piece path up to the order of fp32 (fp64)
sums (tests/test_packing.py: 1e-12 in fp64, 4 ulps of the largest value in fp32), and the bytes sent are
the same, so the mode is not part of the cross-rank call check (Note [Cross-rank call check]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from cp_dtensor.attention.kernels import AttentionKernel
from cp_dtensor.attention.plan import Piece, PieceKind, RingPlan, buffer_slice
from cp_dtensor.attention.stats import AttentionStats

__all__ = [
    "PIECE_PACKING",
    "PackedGrad",
    "PackedGroup",
    "PackedStep",
    "apply_piece_packing",
    "build_packed_step",
    "packed_backward",
    "packed_forward",
    "pieces_packing",
    "ring_packing",
]

PIECE_PACKING = ("auto", "packed", "per_piece")
"""The values of ``CPSettings.piece_packing``."""

_CPU_AUTO_PACKS = False  # measured, Note [Piece packing]: the per-piece path is faster on CPU
_GPU_VARLEN_VERIFIED = False  # True once scripts/check_cuda.sh has passed the varlen checks on a GPU

T = TypeVar("T")


def apply_piece_packing(kernel: AttentionKernel, mode: str) -> AttentionKernel:
    """``kernel`` with ``pack_pieces`` set from ``mode`` (one of :data:`PIECE_PACKING`, Note [Piece packing])."""
    if mode not in PIECE_PACKING:
        raise ValueError(f"piece_packing must be one of {PIECE_PACKING}, got {mode!r}.")
    auto = (kernel.native_varlen and _GPU_VARLEN_VERIFIED) or (not kernel.native_varlen and _CPU_AUTO_PACKS)
    packed = mode == "packed" or (mode == "auto" and auto)
    return kernel if kernel.pack_pieces == packed else dataclasses.replace(kernel, pack_pieces=packed)


@dataclass(frozen=True, eq=False)
class PackedGroup:
    """One varlen kernel call: the segments of one mask class of a step (Note [Piece packing]).

    Attributes:
        causal: whether every segment is a LOWER square (UPPER pieces enter with reversed rows).
        q_batch, q_row: (Tq,) int64 batch row and local row of each packed query row.
        kv_batch, kv_row: (Tk,) int64 batch row and row of the held KV buffer of each packed key row.
        kv_acc_row: (Tk,) int64 row of each packed key row in the step's dK/dV accumulator.
        cu_q, cu_k: (N + 1,) int32 segment starts in the packed rows.
        max_q, max_k: the longest query / key segment.
        score_elements: visible (query, key) pairs per head over the segments.
        pieces: how many plan pieces the call replaces (counting a piece over b batch rows once).
    """

    causal: bool
    q_batch: torch.Tensor
    q_row: torch.Tensor
    kv_batch: torch.Tensor
    kv_row: torch.Tensor
    kv_acc_row: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    score_elements: int
    pieces: int

    def shapes(self) -> int:
        """Distinct (len_q, len_k) segment shapes: the dense calls of the default varlen loop."""
        lq = (self.cu_q[1:] - self.cu_q[:-1]).tolist()
        lk = (self.cu_k[1:] - self.cu_k[:-1]).tolist()
        return len(set(zip(lq, lk)))


@dataclass(frozen=True, eq=False)
class PackedStep:
    """The packed calls of one step and how their query rows merge into the accumulators.

    Attributes:
        groups: one :class:`PackedGroup` per mask class present (at most two).
        row_batch, row_row: (R,) the distinct (batch row, local row) query rows of the step.
        row_index: (sum of Tq,) for each packed query row of the groups, in order, its index in those R.
        order: (R,) for each of the R rows, a packed row holding it (where each row is in one segment, the
            packed rows in row order).
    """

    groups: tuple[PackedGroup, ...]
    row_batch: torch.Tensor
    row_row: torch.Tensor
    row_index: torch.Tensor
    order: torch.Tensor


def _segments(
    pieces: list[Piece], batch: int, kv_rows: torch.Tensor | None, acc_rows: torch.Tensor | None
) -> list[tuple[int, range, range, range]]:
    """Per piece and batch row: ``(b, q rows, buffer rows, accumulator rows)``, reversed for UPPER."""
    out = []
    for p in pieces:
        at, acc = buffer_slice(kv_rows, p.kv), buffer_slice(acc_rows, p.kv)
        rows = [range(p.q.start, p.q.stop), range(at.start, at.stop), range(acc.start, acc.stop)]
        if p.kind is PieceKind.UPPER:
            rows = [r[::-1] for r in rows]
        out.extend((b, *rows) for b in range(*p.batch.indices(batch)))
    return out


def _group(
    pieces: list[Piece],
    causal: bool,
    batch: int,
    kv_rows: torch.Tensor | None,
    acc_rows: torch.Tensor | None,
    device: torch.device,
) -> PackedGroup:
    """The :class:`PackedGroup` of ``pieces`` (one mask class), index tensors on ``device``."""
    segs = _segments(pieces, batch, kv_rows, acc_rows)
    lq = [len(s[1]) for s in segs]
    lk = [len(s[2]) for s in segs]

    def flat(i: int) -> torch.Tensor:
        return torch.tensor([r for s in segs for r in s[i]], dtype=torch.int64)

    def per_row(lengths: list[int]) -> torch.Tensor:
        return torch.repeat_interleave(torch.tensor([s[0] for s in segs]), torch.tensor(lengths))

    def cu(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    pairs = sum(a * b if not causal else a * (a + 1) // 2 for a, b in zip(lq, lk))
    tensors = [per_row(lq), flat(1), per_row(lk), flat(2), flat(3), cu(lq), cu(lk)]
    q_b, q_r, kv_b, kv_r, kv_acc, cu_q, cu_k = (t.to(device) for t in tensors)
    return PackedGroup(causal, q_b, q_r, kv_b, kv_r, kv_acc, cu_q, cu_k, max(lq), max(lk), pairs, len(pieces))


def build_packed_step(
    pieces: tuple[Piece, ...],
    *,
    batch: int,
    kv_rows: torch.Tensor | None,
    acc_rows: torch.Tensor | None,
    device: torch.device,
) -> PackedStep | None:
    """The packed calls of one step's ``pieces``, or None when packing would not make fewer calls.

    Args:
        pieces: the step's pieces (kv rows local to the source, or buffer rows for the all-gather).
        batch: the call's batch size B (a piece over every batch row is one segment per row).
        kv_rows: sorted local rows in the held KV buffer (None: the buffer holds every row).
        acc_rows: sorted local rows of the dK/dV accumulator the step adds to (None: every row).
        device: where the index tensors live (the call's device).
    """
    classes = [
        [p for p in pieces if p.kind is PieceKind.FULL],
        [p for p in pieces if p.kind is not PieceKind.FULL],
    ]
    classes_present = [(causal, sel) for causal, sel in zip((False, True), classes) if sel]
    if len(classes_present) >= len(pieces):
        return None
    groups = tuple(_group(sel, causal, batch, kv_rows, acc_rows, device) for causal, sel in classes_present)
    s_local = 1 + max(int(g.q_row.max()) for g in groups)
    key = torch.cat([g.q_batch * s_local + g.q_row for g in groups])  # (sum Tq,) flat row ids
    unique, index = torch.unique(key, return_inverse=True)
    order = torch.empty(unique.numel(), dtype=torch.int64, device=device)
    order[index] = torch.arange(index.numel(), device=device)  # a packed row of each distinct row
    return PackedStep(groups, unique // s_local, unique % s_local, index, order)


def _cached(cache: dict, key: tuple, build: Callable[[], T]) -> T:
    """``cache[key]``, built on first use (None is a value: a step that is not packed)."""
    if key not in cache:
        cache[key] = build()
    return cache[key]


def ring_packing(plan: RingPlan, batch: int, device: torch.device) -> tuple[PackedStep | None, ...]:
    """Per ring step, its packing (None: the step runs piece by piece); cached on the plan.

    Step 0 adds to this rank's own dK/dV (every local row), step s >= 1 to the accumulator of
    ``plan.acc_rows[s]`` (Note [Ring attention, forward and backward]).
    """

    def build() -> tuple[PackedStep | None, ...]:
        return tuple(
            build_packed_step(
                pieces,
                batch=batch,
                kv_rows=plan.held_rows[s],
                acc_rows=plan.acc_rows[s] if s else None,
                device=device,
            )
            for s, pieces in enumerate(plan.pieces)
        )

    return _cached(plan.cache, ("ring", batch, device), build)


def pieces_packing(
    cache: dict, pieces: tuple[Piece, ...], batch: int, device: torch.device
) -> PackedStep | None:
    """The packing of pieces whose kv rows index one buffer that is also the dK/dV accumulator (the
    all-gather driver's), cached in ``cache`` (its plan's)."""
    return _cached(
        cache,
        ("pieces", batch, device),
        lambda: build_packed_step(pieces, batch=batch, kv_rows=None, acc_rows=None, device=device),
    )


def _count(stats: AttentionStats | None, phase: str, group: PackedGroup, heads: int) -> None:
    if stats is not None:
        stats.count(phase, group.score_elements * heads)


def _take(x: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Rows ``(b, r)`` of ``x`` (B, H, S, ...) as packed (T, H, ...). One batch row: an index_select per
    row, far faster on CPU than indexing two dims around a slice (the result is head-major, a transposed view)."""
    if x.shape[0] == 1:
        return x[0].index_select(1, r).transpose(0, 1)
    return x[b, :, r]


def _add_(x: torch.Tensor, b: torch.Tensor, r: torch.Tensor, src: torch.Tensor) -> None:
    """``x[b, :, r] += src`` for (T, H, ...) ``src`` with rows repeating (accumulating, in place)."""
    if x.shape[0] == 1:
        x[0].index_add_(1, r, src.to(x.dtype).transpose(0, 1))
    else:
        x.transpose(1, 2).index_put_((b, r), src.to(x.dtype), accumulate=True)


def _put_(x: torch.Tensor, b: torch.Tensor, r: torch.Tensor, src: torch.Tensor) -> None:
    """``x[b, :, r] = src`` for (T, H, ...) ``src`` with distinct rows (in place)."""
    if x.shape[0] == 1:
        x[0].index_copy_(1, r, src.to(x.dtype).transpose(0, 1))
    else:
        x[b, :, r] = src.to(x.dtype)


def packed_forward(
    kernel: AttentionKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    step: PackedStep,
    scale: float,
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    stats: AttentionStats | None = None,
    *,
    fresh: bool = False,
) -> None:
    """Run a packed step and merge it into the accumulators in place (Note [Piece packing]).

    Args:
        q: (B, Hq, S_local, D) local queries; k, v: (B, Hkv, rows, D) the held KV buffer.
        out_acc: (B, Hq, S_local, D) fp32 (fp64) accumulator; lse_acc: (B, Hq, S_local) the same dtype.
        fresh: the accumulators hold nothing yet (zeros, -inf): rows in one segment each are copied in.
    """
    outs, lses = [], []
    for g in step.groups:
        out_g, lse_g = kernel.varlen_forward(
            _take(q, g.q_batch, g.q_row), _take(k, g.kv_batch, g.kv_row), _take(v, g.kv_batch, g.kv_row),
            g.cu_q, g.cu_k, g.max_q, g.max_k, is_causal=g.causal, scale=scale,
        )  # fmt: skip
        outs.append(out_g)  # (Tq, Hq, D)
        lses.append(lse_g)  # (Tq, Hq)
        _count(stats, "forward", g, q.shape[1])
    out_p = torch.cat(outs) if len(outs) > 1 else outs[0]  # (sum Tq, Hq, D)
    lse_p = torch.cat(lses) if len(lses) > 1 else lses[0]  # (sum Tq, Hq)
    if fresh and step.row_index.numel() == step.row_row.numel():  # no row twice: nothing to merge
        _put_(out_acc, step.row_batch, step.row_row, out_p[step.order])
        _put_(lse_acc, step.row_batch, step.row_row, lse_p[step.order])
        return
    _merge_rows_(out_acc, lse_acc, step, out_p.to(out_acc.dtype), lse_p.to(lse_acc.dtype))


def _merge_rows_(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, step: PackedStep, out_p: torch.Tensor, lse_p: torch.Tensor
) -> None:
    """Note [LSE merge] of every packed row into its accumulator row, rows repeating (Note [Piece packing])."""
    rb, rr, idx = step.row_batch, step.row_row, step.row_index
    cur_out = _take(out_acc, rb, rr)  # (R, Hq, D)
    cur_lse = _take(lse_acc, rb, rr)  # (R, Hq)
    m = cur_lse.scatter_reduce(0, idx[:, None].expand_as(lse_p), lse_p, "amax")  # (R, Hq): max of parts
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_cur = torch.exp(cur_lse - m)  # (R, Hq)
    w_p = torch.exp(lse_p - m[idx])  # (sum Tq, Hq)
    total = w_cur.index_add(0, idx, w_p)  # > 0: every row has a part
    _put_(lse_acc, rb, rr, m + torch.log(total))
    merged = cur_out * (w_cur / total).unsqueeze(-1)
    merged.index_add_(0, idx, out_p * (w_p / total[idx]).unsqueeze(-1))
    _put_(out_acc, rb, rr, merged)


@dataclass(frozen=True, eq=False)
class PackedGrad:
    """dK / dV of one packed call, to scatter-add into the step's accumulator (rows ``kv_acc_row``)."""

    group: PackedGroup
    dk: torch.Tensor  # (Tk, Hkv, D)
    dv: torch.Tensor

    def add_into(self, dk_acc: torch.Tensor, dv_acc: torch.Tensor) -> None:
        """Add into (B, Hkv, rows, D) accumulators (rows: the accumulator's the packing was built for)."""
        _add_(dk_acc, self.group.kv_batch, self.group.kv_acc_row, self.dk)
        _add_(dv_acc, self.group.kv_batch, self.group.kv_acc_row, self.dv)


def packed_backward(
    kernel: AttentionKernel,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    step: PackedStep,
    scale: float,
    dq_acc: torch.Tensor,
    stats: AttentionStats | None = None,
) -> list[PackedGrad]:
    """Backward of a packed step: adds dq into ``dq_acc`` (B, Hq, S_local, D) in place, returns dK / dV.

    Args:
        dout, q, out: (B, Hq, S_local, D); lse: (B, Hq, S_local) the merged forward results.
        k, v: (B, Hkv, rows, D) the held KV buffer.
    """
    grads = []
    for g in step.groups:
        b, r = g.q_batch, g.q_row
        dq, dk, dv = kernel.varlen_backward(
            _take(dout, b, r), _take(q, b, r), _take(k, g.kv_batch, g.kv_row), _take(v, g.kv_batch, g.kv_row),
            _take(out, b, r), _take(lse, b, r), g.cu_q, g.cu_k, g.max_q, g.max_k, is_causal=g.causal,
            scale=scale,
        )  # fmt: skip
        _add_(dq_acc, b, r, dq)
        grads.append(PackedGrad(g, dk, dv))
        _count(stats, "backward", g, q.shape[1])
    return grads
