"""The data one CP rank's ring runs on: pieces (kernel calls) per step and the KV rows that travel.

Note [Ring plan]
~~~~~~~~~~~~~~~~
Every ring variant - causal zigzag or contiguous, bidirectional, packed documents, sliding windows, and
the ring across groups of the hybrid strategy - is one :class:`RingPlan` for the one ring driver
(``cp_dtensor.attention.ring``)::

    step s (rank r holds rows held[s] of the KV of src = r - s):
      send  rows send[s] of the held buffer -> r + 1      None: the whole buffer, as received
      recv  held[s + 1] rows of src - 1's KV <- r - 1      None: all S_local rows; empty: no message
      compute the pieces of step s: FULL / LOWER / UPPER kernel calls on (q rows x held KV rows)
      merge each piece's (out, lse) into fp32 accumulators at its query rows   (Note [LSE merge])

    backward: src's dK/dV accumulator holds rows acc[s] after rank src + s adds to it, travels one hop
    per step and arrives home after cp - 1 hops (home rows); None again means all rows.

The unmasked schedules (Note [Ring schedule]) are plans whose rows are all None (the KV buffer travels
unchanged, nothing is indexed); the masked plans (Notes [Masked pieces], [Masked ring traffic]) name the
rows someone further along needs. A piece is a rectangle of local query rows x local KV rows of the source
with one of three masks::

    FULL  [ #### ]     LOWER  [ #    ]      UPPER  [ #### ]     (UPPER runs as LOWER on row-reversed
          [ #### ]            [ ##   ]             [  ### ]      queries and keys)
          [ #### ]            [ ###  ]             [   ## ]

so no masked score is ever computed and the kernels only ever see "no mask" or "causal, square".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from cp_dtensor.attention.kernels import AttentionKernel
from cp_dtensor.attention.stats import AttentionStats

__all__ = [
    "Piece",
    "PieceKind",
    "RingPlan",
    "buffer_slice",
    "count_piece",
    "piece_backward",
    "piece_forward",
]


class PieceKind(Enum):
    """How a piece's rectangle is masked."""

    FULL = "full"
    LOWER = "lower"  # square; key offset <= query offset (the kernel's is_causal)
    UPPER = "upper"  # square; key offset >= query offset (run as LOWER on reversed rows)


@dataclass(frozen=True)
class Piece:
    """One kernel call: batch rows x local query rows x local rows of the KV source rank."""

    batch: slice
    q: slice
    kv: slice
    kind: PieceKind

    @property
    def pairs_per_row(self) -> int:
        """Visible (query, key) pairs per batch row and head."""
        nq, nk = self.q.stop - self.q.start, self.kv.stop - self.kv.start
        return nq * nk if self.kind is PieceKind.FULL else nq * (nq + 1) // 2

    def score_elements(self, batch_size: int) -> int:
        """Visible pairs per head over the piece's batch rows (``batch_size``: the call's B)."""
        rows = len(range(*self.batch.indices(batch_size)))
        return rows * self.pairs_per_row

    def covers(self, batch_size: int, s_local: int) -> bool:
        """Whether the piece's query rows are every row of the local shard (all batch rows)."""
        return (
            self.batch.indices(batch_size) == (0, batch_size, 1)
            and self.q.start == 0
            and self.q.stop == s_local
        )


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Everything one rank needs to run the ring (forward and backward), Note [Ring plan].

    Attributes:
        rank, cp, s_local: this rank, the ring size, the local sequence length.
        pieces: per step s (KV of rank ``rank - s``), the pieces (kv rows local to that rank).
        held_rows: per step s, the sorted local rows of src's KV held at step s; None = all rows.
        send_index: per step s < cp - 1, positions (in the held buffer) of the rows forwarded to the next
            rank; None = the whole held buffer.
        acc_rows: per step s >= 1, the rows of src's dK/dV accumulator after this rank adds to it (step 0:
            unused); None = all rows.
        acc_in_rows: per step s >= 2, the rows of the accumulator received from the previous rank.
        home_rows: rows of this rank's own accumulator arriving home at the end; None = all rows.
        shared_rows: per rank, its local KV rows that some other rank needs (what an all-gather must carry);
            None = all rows.
        cache: facts derived from the plan and kept with it (the packing per batch size and device, Note
            [Piece packing]); each a pure function of the plan and its key.
    """

    rank: int
    cp: int
    s_local: int
    pieces: tuple[tuple[Piece, ...], ...]
    held_rows: tuple[torch.Tensor | None, ...]
    send_index: tuple[torch.Tensor | None, ...]
    acc_rows: tuple[torch.Tensor | None, ...]
    acc_in_rows: tuple[torch.Tensor | None, ...]
    home_rows: torch.Tensor | None
    shared_rows: tuple[torch.Tensor | None, ...]
    cache: dict = field(default_factory=dict, repr=False)

    def score_elements(self, batch_size: int) -> int:
        """Visible pairs per head this rank computes (forward; backward the same)."""
        return sum(p.score_elements(batch_size) for step in self.pieces for p in step)

    def kernel_calls(self) -> int:
        """Kernel calls of one forward (the backward makes as many)."""
        return sum(len(step) for step in self.pieces)

    def rows_held(self, step: int) -> int:
        """How many rows of src's KV this rank holds at ``step``."""
        rows = self.held_rows[step]
        return self.s_local if rows is None else rows.numel()

    def needed_rows(self) -> list[int]:
        """Per source rank, how many of its rows this rank's pieces read (the minimum to receive)."""
        counts = [0] * self.cp
        for step, pieces in enumerate(self.pieces):
            seen = torch.zeros(self.s_local, dtype=torch.bool)
            for p in pieces:
                seen[p.kv] = True
            counts[(self.rank - step) % self.cp] = int(seen.sum())
        return counts


def buffer_slice(rows: torch.Tensor | None, local: slice) -> slice:
    """Where the consecutive local rows ``local`` sit in a buffer holding the sorted local ``rows``
    (None: the buffer holds every row, so the slice is ``local`` itself)."""
    if rows is None:
        return local
    start = int(torch.searchsorted(rows, torch.tensor(local.start)))
    return slice(start, start + local.stop - local.start)


def piece_forward(
    kernel: AttentionKernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_rows: slice,
    piece: Piece,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one piece: ``q`` (B, Hq, S_local, D) rows against ``k``/``v`` buffer rows."""
    qp = q[piece.batch, :, piece.q]  # (b, Hq, nq, D)
    kp, vp = k[piece.batch, :, kv_rows], v[piece.batch, :, kv_rows]  # (b, Hkv, nk, D)
    if piece.kind is PieceKind.UPPER:
        out, lse = kernel.forward(qp.flip(2), kp.flip(2), vp.flip(2), is_causal=True, scale=scale)
        return out.flip(2), lse.flip(-1)
    return kernel.forward(qp, kp, vp, is_causal=piece.kind is PieceKind.LOWER, scale=scale)


def piece_backward(
    kernel: AttentionKernel,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_rows: slice,
    out: torch.Tensor,
    lse: torch.Tensor,
    piece: Piece,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of one piece given the merged ``out`` and ``lse`` of its query rows."""
    b, r = piece.batch, piece.q
    args = [dout[b, :, r], q[b, :, r], k[b, :, kv_rows], v[b, :, kv_rows], out[b, :, r]]
    if piece.kind is PieceKind.UPPER:
        flipped = [t.flip(2) for t in args]
        dq, dk, dv = kernel.backward(*flipped, lse[b, :, r].flip(-1), is_causal=True, scale=scale)
        return dq.flip(2), dk.flip(2), dv.flip(2)
    return kernel.backward(*args, lse[b, :, r], is_causal=piece.kind is PieceKind.LOWER, scale=scale)


def count_piece(stats: AttentionStats | None, phase: str, q: torch.Tensor, piece: Piece) -> None:
    """Account one kernel call of ``piece`` in ``stats``: batch rows x query heads x visible pairs."""
    if stats is not None:
        stats.count(phase, piece.score_elements(q.shape[0]) * q.shape[1])
