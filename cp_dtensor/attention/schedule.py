"""Which attention block each CP rank computes at each ring step.

Note [Ring schedule]
~~~~~~~~~~~~~~~~~~~~
At step s rank r holds the KV shard of rank src = (r - s) mod CP (KV moves one rank forward per step).
With the zigzag layout (see Note [Sequence layouts]) rank r's queries are chunks (r, 2CP-1-r), written
q = [q_lo | q_hi], and the KV from src is kv = [kv_lo | kv_hi] = chunks (src, 2CP-1-src). Causal cases::

    step 0 (src == r):   q x kv, causal           the diagonal block: every row sees >= 1 key
    src < r:             q x kv_lo, no mask       chunk src precedes both of r's chunks; kv_hi follows both
    src > r:             q_hi x kv, no mask       q_lo precedes all of src's chunks; q_hi follows both

              kv_lo kv_hi                 kv_lo kv_hi
    q_lo    [  ##    ..  ]     q_lo     [  ..    ..  ]
    q_hi    [  ##    ..  ]     q_hi     [  ##    ##  ]
              src < r                      src > r

Both off-diagonal cases are half blocks (S_local x S_local/2), so every rank does the same work at every
step and no masked score is ever computed. Contiguous causal: src < r is a full unmasked block, src > r is
skipped (never computed; the KV still passes on). Bidirectional: every step is a full unmasked block.
The schedule is pure arithmetic on (rank, step); :func:`build_ring_plan` turns it into the
:class:`~cp_dtensor.attention.plan.RingPlan` the one ring driver runs (Note [Ring plan]): every block is one
piece, and every row of the KV buffer travels (no row indexing).
"""

from __future__ import annotations

import functools

from cp_dtensor.attention.plan import Piece, PieceKind, RingPlan
from cp_dtensor.layout import layout_chunk_ids, validate_layout

__all__ = ["build_gather_pieces", "build_ring_plan", "ring_source"]


def ring_source(rank: int, step: int, cp: int) -> int:
    """Rank whose KV shard ``rank`` holds at ``step``."""
    return (rank - step) % cp


_ALL = slice(None)


def _halves(n: int) -> tuple[slice, slice, slice]:
    return slice(0, n), slice(0, n // 2), slice(n // 2, n)


@functools.lru_cache(maxsize=256)
def build_ring_plan(rank: int, cp: int, layout: str, is_causal: bool, s_local: int) -> RingPlan:
    """The unmasked ring of ``rank`` (Note [Ring schedule]) as a :class:`RingPlan` (Note [Ring plan]).

    Pure arithmetic on its arguments, so it is memoized (a cache of facts: a plan never changes).
    """
    validate_layout(layout)
    every, first, second = _halves(s_local)
    steps: list[tuple[Piece, ...]] = []
    for step in range(cp):
        src = ring_source(rank, step, cp)
        if not is_causal:
            piece = Piece(_ALL, every, every, PieceKind.FULL)
        elif src == rank:
            piece = Piece(_ALL, every, every, PieceKind.LOWER)
        elif layout == "zigzag":
            piece = (
                Piece(_ALL, every, first, PieceKind.FULL)
                if src < rank
                else Piece(_ALL, second, every, PieceKind.FULL)
            )
        elif src < rank:
            piece = Piece(_ALL, every, every, PieceKind.FULL)
        else:
            steps.append(())
            continue
        steps.append((piece,))
    none = (None,) * cp
    return RingPlan(
        rank=rank,
        cp=cp,
        s_local=s_local,
        pieces=tuple(steps),
        held_rows=none,
        send_index=none,
        acc_rows=none,
        acc_in_rows=none,
        home_rows=None,
        shared_rows=none,
    )


def build_gather_pieces(rank: int, cp: int, layout: str, is_causal: bool, s_local: int) -> tuple[Piece, ...]:
    """Kernel calls of ``rank`` against the all-gathered KV in natural order, without masked work.

    Note [All-gather blocks]
    ~~~~~~~~~~~~~~~~~~~~~~~~
    Bidirectional: one call, all local queries x the whole sequence. Causal: each local query chunk c
    (of length L) makes two calls, so no masked score is computed and no mask tensor is needed::

        keys (natural order): [ 0 ........ cL | cL .. (c+1)L | ... ]
        query chunk c:          prefix, no mask    diagonal,     never
                                                   causal
    """
    chunk_ids = layout_chunk_ids(rank, cp, layout)
    if not is_causal:
        return (Piece(_ALL, slice(0, s_local), slice(0, s_local * cp), PieceKind.FULL),)
    chunk_len = s_local // len(chunk_ids)
    pieces = []
    for j, c in enumerate(chunk_ids):
        q_rows = slice(j * chunk_len, (j + 1) * chunk_len)
        pieces.append(Piece(_ALL, q_rows, slice(c * chunk_len, (c + 1) * chunk_len), PieceKind.LOWER))
        if c > 0:
            pieces.append(Piece(_ALL, q_rows, slice(0, c * chunk_len), PieceKind.FULL))
    return tuple(pieces)
