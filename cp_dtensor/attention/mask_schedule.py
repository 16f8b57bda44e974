"""The masked schedule: which exact pieces each rank computes, and which KV rows travel where.

Note [Masked pieces]
~~~~~~~~~~~~~~~~~~~~
With documents and windows the visible keys of a query form an interval ``[lo, hi]`` whose ends never
decrease (Note [Visible intervals]). For a run of query rows on which both ends move by 0 or 1 per row,
the visible region is cut into at most three kernel calls that compute *only* visible pairs::

    lo, hi constant      lo constant, hi + 1     lo + 1, hi constant     lo + 1, hi + 1 (band of width w)
    [ ######## ]         [ ### #     ]           [ ### #### ]            [ \\ ## \\      ]  per tile of
    [ ######## ]         [ ### ##    ]           [  ## #### ]            [  \\## #\\     ]  w rows:
    [ ######## ]         [ ### ###   ]           [   # #### ]            [   \\# ##\\    ]  UPPER + FULL
       FULL              FULL + LOWER            UPPER + FULL                                + LOWER

A run that starts on the diagonal (a causal document: lo fixed at its start, hi = the row) has no FULL
part: one LOWER square per document piece, the fewest kernel calls the mask allows.

FULL is an unmasked rectangle; LOWER a square with the causal lower triangle (the kernel's ``is_causal``);
UPPER the mirror image, run as LOWER on row-reversed queries and keys. Runs end where a document ends or a
window edge starts to move, so pieces follow documents: a document that ends inside a block costs no
work past its end. Score elements requested equal the visible pairs exactly.

Note [Masked ring traffic]
~~~~~~~~~~~~~~~~~~~~~~~~~~
``needed[dst][src]`` marks the rows of src's local KV that some query of dst sees (over all batch rows).
In the ring, src's KV is held by rank src + s at step s and forwarded one hop per step, so the message
leaving step s carries only ``held[src][s + 1] = OR over t > s of needed[src + t][src]``: rows nobody
further along the ring needs are dropped, and a block nobody needs is never sent. In backward, src's
dK/dV accumulator leaving rank src + s carries ``acc[src][s] = OR over 1 <= t <= s of needed[src + t][src]``
(what has been added so far) and arrives home after cp - 1 hops::

    window (left 2) at CP = 4, contiguous: rank r only needs the last 2 rows of rank r - 1
    step 1 messages: 2 rows each (instead of S/cp);   steps 2, 3: nothing is sent
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict

import torch

from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.plan import Piece, PieceKind, RingPlan
from cp_dtensor.layout import LayoutLike, rank_segments, sequence_positions

__all__ = ["band_pieces", "build_masked_plan"]


def band_pieces(
    lo: torch.Tensor, hi: torch.Tensor, q_range: tuple[int, int], kv_range: tuple[int, int]
) -> list[tuple[int, int, int, int, PieceKind]]:
    """Exact pieces of the visible region of global query rows ``q_range`` x keys ``kv_range``.

    Args:
        lo, hi: (S,) visible key interval of every query (Note [Visible intervals]).
        q_range, kv_range: ``[start, stop)`` global positions.

    Returns:
        ``(q_start, q_stop, k_start, k_stop, kind)`` in global positions (Note [Masked pieces]).
    """
    a, b = q_range
    c, d = kv_range
    if a >= b or c >= d or int(lo[a]) > d - 1 or int(hi[b - 1]) < c:
        return []
    low = lo[a:b].clamp(min=c)
    high = hi[a:b].clamp(max=d - 1)
    ok = low <= high
    if not bool(ok.any()):
        return []
    n = b - a
    d_low, d_high = low[1:] - low[:-1], high[1:] - high[:-1]
    valid = ok[1:] & ok[:-1] & (d_low >= 0) & (d_low <= 1) & (d_high >= 0) & (d_high <= 1)
    code = torch.where(valid, d_low * 2 + d_high, torch.full_like(d_low, -1))  # transition i -> i + 1
    # Rows that may start a run: row 0, rows after an invalid transition, rows where the code changes.
    candidate = torch.zeros(n, dtype=torch.bool)
    candidate[0] = True
    if n > 1:
        candidate[1:] |= code == -1
        candidate[2:] |= code[1:] != code[:-1]
    cand_t = torch.nonzero(candidate).flatten()
    cand, cand_ok = cand_t.tolist(), ok[cand_t].tolist()
    codes = code.tolist() if n > 1 else []
    # Walk the candidates: an empty row ends the current run (and is in none; empty rows are always
    # candidates, since the transition into them is invalid); a row after an invalid transition starts a
    # run; a row where the code changes starts one unless the row before it just started one.
    starts: list[int] = []  # run starts, and -(row + 1) for empty rows
    for i, row_ok in zip(cand, cand_ok):
        if not row_ok:
            starts.append(-i - 1)
        elif i == 0 or codes[i - 1] == -1 or not starts or starts[-1] != i - 1:
            starts.append(i)
    pieces: list[tuple[int, int, int, int, PieceKind]] = []
    bounds = [*starts, n]
    for k, p in enumerate(starts):
        if p < 0:
            continue
        nxt = bounds[k + 1]
        q = n if nxt == n else (-nxt - 1 if nxt < 0 else nxt)
        _run_pieces(pieces, low, high, p, q, codes[p] if q - p > 1 else 0, a)
    return pieces


def _run_pieces(
    out: list[tuple[int, int, int, int, PieceKind]],
    low: torch.Tensor,
    high: torch.Tensor,
    p: int,
    q: int,
    code: int,
    a: int,
) -> None:
    """Append the pieces of run ``[p, q)`` (local to ``a``) with transition code 2 * dlo + dhi."""
    lp, hp = int(low[p]), int(high[p])
    if q - p == 1 or code == 0:  # constant interval: one rectangle
        out.append((a + p, a + q, lp, hp + 1, PieceKind.FULL))
    elif code == 1:  # lo constant, hi + 1 per row: keys lp..hp-1 for every row, then a causal square
        if hp > lp:
            out.append((a + p, a + q, lp, hp, PieceKind.FULL))
        out.append((a + p, a + q, hp, hp + q - p, PieceKind.LOWER))  # one piece for a whole document
    elif code == 2:  # lo + 1 per row, hi constant: an upper square, then keys past it for every row
        n = q - p
        out.append((a + p, a + q, lp, lp + n, PieceKind.UPPER))
        if hp >= lp + n:
            out.append((a + p, a + q, lp + n, hp + 1, PieceKind.FULL))
    else:  # band: both ends + 1 per row, width w
        w = hp - lp + 1
        u = p
        while u < q:
            t = min(w, q - u)
            lu, hu = lp + (u - p), hp + (u - p)
            out.append((a + u, a + u + t, lu, lu + t, PieceKind.UPPER))
            if w > t:
                out.append((a + u, a + u + t, lu + t, hu + 1, PieceKind.FULL))
            if t > 1:
                out.append((a + u + 1, a + u + t, hu + 1, hu + t, PieceKind.LOWER))
            u += t


def _needed_masks(mask: AttentionMask, layout: LayoutLike, cp: int, seq_len: int) -> list[list[torch.Tensor]]:
    """``needed[dst][src]``: (S_local,) bool over src's local rows seen by some query of dst (any batch row)."""
    lo, hi = mask.intervals(seq_len)  # (B or 1, S)
    s_local = seq_len // cp
    positions = [sequence_positions(seq_len, r, cp, layout) for r in range(cp)]  # (S_local,) or (B, S_local)
    rows = lo.shape[0] if isinstance(layout, str) else max(lo.shape[0], positions[0].shape[0])
    needed = [[torch.zeros(s_local, dtype=torch.bool) for _ in range(cp)] for _ in range(cp)]
    for b in range(rows):
        lo_b, hi_b = lo[min(b, lo.shape[0] - 1)], hi[min(b, hi.shape[0] - 1)]
        pos_b = [p if p.dim() == 1 else p[b] for p in positions]
        for dst in range(cp):
            q = pos_b[dst]
            cover = torch.zeros(seq_len + 1, dtype=torch.int64)
            cover.index_add_(0, lo_b[q], torch.ones(s_local, dtype=torch.int64))
            cover.index_add_(0, hi_b[q] + 1, torch.full((s_local,), -1, dtype=torch.int64))
            seen = cover.cumsum(0)[:seq_len] > 0  # global positions some query of dst sees
            for src in range(cp):
                needed[dst][src] |= seen[pos_b[src]]
    return needed


def _local_offsets(segments: list[tuple[int, int]]) -> list[int]:
    offsets, total = [], 0
    for start, stop in segments:
        offsets.append(total)
        total += stop - start
    return offsets


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).flatten()


# Plans per (mask content, layout, cp, seq_len, rank). Note [Plan cache]: every attention layer of a step
# makes the same call, and a plan costs milliseconds to hundreds of milliseconds (128K tokens), so each is
# built once per batch. The key holds the *content* digest of the document ids (tensor_digest checks the
# content, so a tensor refilled in place gets a new plan); a plan is a pure function of its key, so the
# cache can change no result. Bounded; shared by the simulation's threads, hence the lock.
_PLANS: OrderedDict[tuple, RingPlan] = OrderedDict()
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 16


def build_masked_plan(mask: AttentionMask, layout: LayoutLike, cp: int, seq_len: int, rank: int) -> RingPlan:
    """The ring plan of ``rank`` (Notes [Masked pieces], [Masked ring traffic]), cached per (mask, layout)."""
    key = (mask.fingerprint(), layout, cp, seq_len, rank)
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
    plan = _build(mask, layout, cp, seq_len, rank)
    with _PLANS_LOCK:
        _PLANS[key] = plan
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    return plan


def _build(mask: AttentionMask, layout: LayoutLike, cp: int, seq_len: int, rank: int) -> RingPlan:
    s_local = seq_len // cp
    lo, hi = mask.intervals(seq_len)
    row_dependent = lo.shape[0] > 1 or not isinstance(layout, str)
    n_rows = max(lo.shape[0], 1 if isinstance(layout, str) else layout.batch)
    needed = _needed_masks(mask, layout, cp, seq_len)
    held: list[torch.Tensor] = []
    send_index: list[torch.Tensor] = []
    acc_rows: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)]
    acc_in_rows: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * 2
    for s in range(cp):
        src = (rank - s) % cp
        if s == 0:
            held_mask = torch.ones(s_local, dtype=torch.bool)
        else:
            held_mask = torch.zeros(s_local, dtype=torch.bool)
            for t in range(s, cp):
                held_mask |= needed[(src + t) % cp][src]
        held.append(_rows(held_mask))
        if s >= 1:
            acc_mask = torch.zeros(s_local, dtype=torch.bool)
            for t in range(1, s + 1):
                acc_mask |= needed[(src + t) % cp][src]
            acc_rows.append(_rows(acc_mask))
            if s >= 2:
                prev = torch.zeros(s_local, dtype=torch.bool)
                for t in range(1, s):
                    prev |= needed[(src + t) % cp][src]
                acc_in_rows.append(_rows(prev))
    for s in range(cp - 1):
        src = (rank - s) % cp
        nxt = torch.zeros(s_local, dtype=torch.bool)
        for t in range(s + 1, cp):
            nxt |= needed[(src + t) % cp][src]
        send_index.append(torch.searchsorted(held[s], _rows(nxt)))
    home = torch.zeros(s_local, dtype=torch.bool)
    for t in range(1, cp):
        home |= needed[(rank + t) % cp][rank]
    pieces: list[list[Piece]] = [[] for _ in range(cp)]
    for b in range(n_rows if row_dependent else 1):
        lo_b, hi_b = lo[min(b, lo.shape[0] - 1)], hi[min(b, hi.shape[0] - 1)]
        batch = slice(b, b + 1) if row_dependent else slice(0, None)
        q_segs = rank_segments(layout, rank, cp, seq_len, b)
        q_off = _local_offsets(q_segs)
        q_start = torch.tensor([a for a, _ in q_segs])
        q_stop = torch.tensor([z for _, z in q_segs])
        span_lo, span_hi = lo_b[q_start], hi_b[q_stop - 1]  # keys any query of the segment may see
        for s in range(cp):
            kv_segs = rank_segments(layout, (rank - s) % cp, cp, seq_len, b)
            kv_off = _local_offsets(kv_segs)
            k_start = torch.tensor([a for a, _ in kv_segs])
            k_stop = torch.tensor([z for _, z in kv_segs])
            overlap = (span_lo[:, None] < k_stop[None, :]) & (span_hi[:, None] >= k_start[None, :])
            for i, j in torch.nonzero(overlap).tolist():
                (qa, qb), qo, (ka, kb), ko = q_segs[i], q_off[i], kv_segs[j], kv_off[j]
                for q0, q1, k0, k1, kind in band_pieces(lo_b, hi_b, (qa, qb), (ka, kb)):
                    q_rows = slice(q0 - qa + qo, q1 - qa + qo)
                    pieces[s].append(Piece(batch, q_rows, slice(k0 - ka + ko, k1 - ka + ko), kind))
    return RingPlan(
        rank=rank,
        cp=cp,
        s_local=s_local,
        pieces=tuple(tuple(step) for step in pieces),
        held_rows=tuple(held),
        send_index=(*send_index, None),
        acc_rows=tuple(acc_rows),
        acc_in_rows=tuple(acc_in_rows),
        home_rows=_rows(home),
        shared_rows=tuple(
            _rows(
                functools.reduce(
                    torch.logical_or,
                    [needed[d][src] for d in range(cp) if d != src],
                    torch.zeros(s_local, dtype=torch.bool),
                )
            )
            for src in range(cp)
        ),
    )
