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
The schedule is pure arithmetic on (rank, step), shared by the distributed ring and the single-process
simulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cp_dtensor.layout import layout_chunk_ids, validate_layout

__all__ = ["Block", "GatherBlock", "Part", "build_allgather_blocks", "build_ring_schedule", "ring_source"]


class Part(Enum):
    """Which rows of a local shard a block uses."""

    ALL = "all"
    FIRST_HALF = "first_half"
    SECOND_HALF = "second_half"

    def rows(self, n: int) -> slice:
        """The slice of ``n`` local rows this part selects."""
        if self is Part.ALL:
            return slice(0, n)
        if self is Part.FIRST_HALF:
            return slice(0, n // 2)
        return slice(n // 2, n)

    def length(self, n: int) -> int:
        """Number of rows selected out of ``n``."""
        rows = self.rows(n)
        return rows.stop - rows.start


@dataclass(frozen=True)
class Block:
    """One kernel call of the ring: local query rows x rows of the KV held at ``step``."""

    step: int
    kv_source: int
    q_part: Part
    kv_part: Part
    causal: bool

    def score_elements(self, s_local: int) -> int:
        """Visible (query, key) pairs per batch x head: what the kernel really has to compute."""
        sq, sk = self.q_part.length(s_local), self.kv_part.length(s_local)
        if self.causal:
            return sq * (sq + 1) // 2  # causal blocks are square
        return sq * sk


def ring_source(rank: int, step: int, cp: int) -> int:
    """Rank whose KV shard ``rank`` holds at ``step``."""
    return (rank - step) % cp


def build_ring_schedule(rank: int, cp: int, layout: str, is_causal: bool) -> list[Block | None]:
    """The blocks ``rank`` computes at steps ``0 .. cp-1``; ``None`` where a step computes nothing."""
    validate_layout(layout)
    schedule: list[Block | None] = []
    for step in range(cp):
        src = ring_source(rank, step, cp)
        if not is_causal:
            schedule.append(Block(step, src, Part.ALL, Part.ALL, causal=False))
        elif src == rank:
            schedule.append(Block(step, src, Part.ALL, Part.ALL, causal=True))
        elif layout == "zigzag":
            if src < rank:
                schedule.append(Block(step, src, Part.ALL, Part.FIRST_HALF, causal=False))
            else:
                schedule.append(Block(step, src, Part.SECOND_HALF, Part.ALL, causal=False))
        elif src < rank:
            schedule.append(Block(step, src, Part.ALL, Part.ALL, causal=False))
        else:
            schedule.append(None)
    return schedule


@dataclass(frozen=True)
class GatherBlock:
    """One kernel call of the all-gather variant: local query rows x a range of the gathered sequence."""

    q_rows: slice
    kv_rows: slice
    causal: bool

    def score_elements(self) -> int:
        """Visible (query, key) pairs per batch x head."""
        sq = self.q_rows.stop - self.q_rows.start
        sk = self.kv_rows.stop - self.kv_rows.start
        return sq * (sq + 1) // 2 if self.causal else sq * sk


def build_allgather_blocks(
    rank: int, cp: int, layout: str, is_causal: bool, s_local: int
) -> list[GatherBlock]:
    """Kernel calls of ``rank`` against the all-gathered KV (in natural order), without masked work.

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
        return [GatherBlock(slice(0, s_local), slice(0, s_local * cp), causal=False)]
    chunk_len = s_local // len(chunk_ids)
    blocks = []
    for j, c in enumerate(chunk_ids):
        q_rows = slice(j * chunk_len, (j + 1) * chunk_len)
        blocks.append(GatherBlock(q_rows, slice(c * chunk_len, (c + 1) * chunk_len), causal=True))
        if c > 0:
            blocks.append(GatherBlock(q_rows, slice(0, c * chunk_len), causal=False))
    return blocks
