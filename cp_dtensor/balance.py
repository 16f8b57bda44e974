"""Balanced sequence layouts for packed documents: equal attention work per CP rank, few split documents.

Note [Balanced layout]
~~~~~~~~~~~~~~~~~~~~~~
Each query's attention work is its number of visible keys ``w(i)`` (Note [Visible intervals]). Every rank
must hold exactly ``C = S / cp`` tokens of a row, and we want each rank's work near ``W / cp``. Per row:

1. Items are whole documents. Order them by work per token (light -> heavy, ties in natural order) and lay
   their tokens end to end, each item in natural order: the *flat* order::

       natural:  | a a | b b b b b b b b | c | d d d |        (causal: w = offset in document + 1)
       flat:     | c | a a | d d d | b b b b b b b b |
                   ^ light end                       ^ heavy end

2. Ranks 0 .. cp-2 in turn take ``C - h`` tokens from the light end and ``h`` from the heavy end, i.e. two
   runs of the flat order. ``h`` (0 .. C, all tried at once) is the one whose work brings the running
   total closest to ``(r + 1) W / cp``; among the ``h`` that keep it within ``tolerance * W / cp``, the one
   that cuts the fewest documents (a run end on a document boundary is free) wins, then the closest::

       flat:     | c | a a | d d d | b b b b b b b b |
       rank 0:     [C - h    )                 [  h  )
       rank 1:               [C - h  )   [  h  )
       last:                         [ rest )

3. The last rank takes the middle that is left. A rank's positions are sorted, so its local shard keeps
   natural order (the causal mask inside a shard is a lower triangle per document).
4. If some rank ends above ``1 + 2 x tolerance + 0.005`` times the mean, plan again with items cut into
   pieces of at most C, C/2, ..., C/8 tokens (piece starts at multiples of the length within each document);
   the first plan within that bound wins, else the most balanced one, or zigzag if that is better still
   (shards of a few tokens, where token granularity rules).
5. Rows (B > 1) are planned one by one, each on its own: a row's layout depends on that row alone, so
   any subset of rows (a pipeline microbatch, an accumulation chunk) has the layout its batch was sharded
   with, and :class:`BalancedLayoutRule` (the per-batch rule of the CP styles) gives exactly this layout.

Why it balances: if the flat order had non-decreasing token work, the C lightest and the C heaviest
remaining tokens would bracket every target (zigzag's argument). Whole documents are close to that unless
several causal documents each span many ranks: a half-eaten long document leaves light tokens at the
heavy end. Pieces of at most C tokens restore the near-monotone order (step 4), at the price of a few more
cuts. The running target keeps every rank within ``1 +- 2 x tolerance`` of the mean while the targets are
bracketed. For one causal document the flat order is the natural order and the best ``h`` is ``C / 2``:
exactly zigzag.

Why it communicates little: only the 2 (cp - 1) run ends (and, after step 4, piece starts where two
ranks meet) can fall inside a document, so short documents stay whole on one rank unless a run end lands
in one, and a long document becomes a few long contiguous pieces (for a sliding window only the last
``left`` keys before each cut cross ranks). Cost per row and plan: vectorized passes over the S tokens,
one sort of the items, and cp - 1 vectorized steps over C + 1 candidates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from cp_dtensor.attention.mask import AttentionMask, validate_mask_inputs
from cp_dtensor.layout import (
    LayoutLike,
    LayoutRule,
    SequenceLayout,
    layout_permutation,
    tensor_digest,
    validate_seq_len,
)

__all__ = [
    "BalancedLayoutRule",
    "balanced_layout",
    "count_split_documents",
    "layout_crossing_kv_rows",
    "layout_work",
    "to_sequence_layout",
]

DEFAULT_TOLERANCE = 0.01
"""Default ``tolerance`` of :func:`balanced_layout`: per-rank work within 1 +- 2% of the mean."""


def _validate(
    document_ids: torch.Tensor, cp: int, is_causal: bool, window_size: tuple[int, int], tolerance: float
) -> None:
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(
            f"cp must be an integer >= 1 (the CP group size, e.g. mesh['cp'].size()), got {cp!r}."
        )
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be True or False, got {is_causal!r}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < 1:
        raise ValueError(
            f"tolerance must be a number in [0, 1) (allowed per-rank work deviation as a fraction of the "
            f"mean, traded for fewer split documents), got {tolerance!r}; the default is {DEFAULT_TOLERANCE}."
        )
    shape = tuple(getattr(document_ids, "shape", ()))
    batch, seq_len = shape if len(shape) == 2 else (0, 0)
    validate_mask_inputs(document_ids, window_size, batch=batch, seq_len=seq_len)
    if seq_len % cp:
        raise ValueError(
            f"document_ids has sequence length {seq_len}, which is not a multiple of cp={cp}: every rank "
            f"holds exactly S / cp tokens of each row. Pad the packed batch to a multiple of {cp} "
            f"(e.g. {(seq_len // cp + 1) * cp}) with one more document."
        )


def balanced_layout(
    document_ids: torch.Tensor,
    cp: int,
    *,
    is_causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    tolerance: float = DEFAULT_TOLERANCE,
) -> SequenceLayout:
    """A layout that gives every CP rank the same attention work on packed documents (Note [Balanced layout]).

    Args:
        document_ids: (B, S) integer tensor, natural order; documents are contiguous runs of equal ids.
        cp: the CP group size; S must be a multiple of it.
        is_causal: the mask the layout is balanced for (as in the attention call).
        window_size: ``(left, right)`` sliding window as in flash-attn; -1 = unbounded.
        tolerance: how far (fraction of the mean) the running work may drift from its target to avoid
            cutting a document; each rank then ends within ``1 +- 2 x tolerance`` of the mean. 0 balances as
            exactly as token granularity allows (more documents cut).

    Returns:
        A :class:`SequenceLayout` named ``"balanced"``: each rank holds S / cp positions of every row, in
        increasing order; accepted wherever a layout name is.

    Raises:
        ValueError: bad ``document_ids`` (shape, dtype, non-contiguous documents), ``cp`` < 1, S not a
            multiple of ``cp``, a window below -1 or a ``tolerance`` outside [0, 1); before any work.
    """
    _validate(document_ids, cp, is_causal, window_size, tolerance)
    ids = document_ids.cpu()
    batch, seq_len = ids.shape
    work = AttentionMask(is_causal, tuple(window_size), ids).visible_counts(seq_len).expand(batch, seq_len)
    positions = torch.empty(batch, seq_len, dtype=torch.int64)
    for row in range(batch):  # step 5: each row on its own
        positions[row] = _plan_row(ids[row], work[row], cp, tolerance)[0]
    return SequenceLayout(positions, cp, "balanced")


REFINE_SLACK = 0.005
"""Step 4 of Note [Balanced layout] replans when max / mean exceeds ``1 + 2 x tolerance + REFINE_SLACK``."""


def _plan_row(
    ids: torch.Tensor, work: torch.Tensor, cp: int, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan one row: whole documents first, then shorter pieces (Note [Balanced layout], step 4).

    Returns:
        (S,) positions, rank by rank and increasing within a rank, and (cp,) int64 work of each rank.
    """
    seq_len = ids.numel()
    local = seq_len // cp
    pos = torch.arange(seq_len, dtype=torch.int64)
    if local == 0 or cp == 1:
        return pos, work.view(cp, local).sum(dim=1)
    doc_start = torch.ones(seq_len, dtype=torch.bool)
    doc_start[1:] = ids[1:] != ids[:-1]  # (S,) first token of a document
    prefix = torch.zeros(seq_len + 1, dtype=torch.int64)
    prefix[1:] = work.cumsum(0)  # (S + 1,) work of tokens [0, i)
    bound = (1 + 2 * tolerance + REFINE_SLACK) * float(prefix[-1]) / cp
    best = (pos, torch.full((cp,), int(prefix[-1]) + 1))  # worse than any plan
    item_start, offset = doc_start, None
    for piece in (None, local, local // 2, local // 4, local // 8):
        if piece is not None:
            if offset is None:  # only needed when whole documents do not balance
                offset = pos - torch.where(doc_start, pos, 0).cummax(0).values  # (S,) offset in its document
            if piece < 1 or bool((offset < piece).all()):
                continue  # pieces that cut nothing: the same plan as whole documents
            item_start = doc_start | (offset % piece == 0)
        plan = _balance_row(item_start, doc_start, work, prefix, cp, tolerance)
        if plan[1].max() < best[1].max():
            best = plan
        if plan[1].max() <= bound:
            return plan
    if seq_len % (2 * cp) == 0:  # tiny shards: token granularity rules; never worse than zigzag
        zigzag = layout_permutation(seq_len, cp, "zigzag")
        zigzag_work = work[zigzag].view(cp, local).sum(dim=1)
        if zigzag_work.max() < best[1].max():
            best = (zigzag, zigzag_work)
    return best


def _balance_row(
    item_start: torch.Tensor,
    doc_start: torch.Tensor,
    work: torch.Tensor,
    prefix: torch.Tensor,
    cp: int,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of Note [Balanced layout] for one row and one choice of items.

    Args:
        item_start: (S,) bool, True at the first token of each item (document or piece).
        doc_start: (S,) bool, True at the first token of each document.
        work: (S,) int64 visible keys of each query.
        prefix: (S + 1,) int64 cumulative ``work``.
        cp: the CP size (>= 2, with S / cp >= 1).
        tolerance: as in :func:`balanced_layout`.

    Returns:
        (S,) positions, rank by rank and increasing within a rank, and (cp,) int64 work of each rank.
    """
    seq_len = work.numel()
    local = seq_len // cp
    starts = item_start.nonzero().view(-1)  # (D,) items in natural order
    lengths = torch.diff(starts, append=starts.new_tensor([seq_len]))  # (D,)
    item_work = prefix[starts + lengths] - prefix[starts]  # (D,)

    # 1. flat order: items light -> heavy per token; extended by a sentinel item at flat slot S
    order = torch.sort(item_work.double() / lengths.double(), stable=True).indices  # (D,)
    flat_len = lengths[order]
    flat_start = torch.cat([flat_len.cumsum(0) - flat_len, flat_len.new_tensor([seq_len])])  # (D + 1,)
    flat_src = torch.cat([starts[order], starts.new_tensor([seq_len])])  # natural start of each item
    flat_token = torch.repeat_interleave(flat_src[:-1] - flat_start[:-1], flat_len, output_size=seq_len)
    flat_token += torch.arange(seq_len, dtype=torch.int64)  # (S,) token at each flat slot
    flat_prefix = torch.zeros(seq_len + 1, dtype=torch.int64)
    flat_prefix[1:] = work[flat_token].cumsum(0)  # (S + 1,) work of flat[:q]
    inside = torch.zeros(seq_len + 1, dtype=torch.bool)
    inside[:seq_len] = ~doc_start[flat_token]  # (S + 1,) a run end at flat slot q cuts a document

    # 2. ranks 0 .. cp-2: C - h tokens from the light end, h from the heavy end; candidates h = 0 .. C are
    # contiguous flat slots, so each is a reversed slice: light end at light_lo + C - h, heavy at heavy_hi - h
    mean = float(flat_prefix[-1]) / cp
    slack = tolerance * mean
    h = torch.arange(local + 1, dtype=torch.int64)  # (C + 1,)
    runs: list[tuple[int, int, int]] = []  # (flat start, flat stop, rank)
    light_lo, heavy_hi, done = 0, seq_len, 0
    works = torch.empty(cp, dtype=torch.int64)
    for rank in range(cp - 1):
        light = slice(light_lo, light_lo + local + 1)
        heavy = slice(heavy_hi - local, heavy_hi + 1)
        ends = int(flat_prefix[heavy_hi] - flat_prefix[light_lo])
        taken = (flat_prefix[light] - flat_prefix[heavy]).flip(0) + ends  # (C + 1,) work of the two runs
        miss = (done + taken).double().sub_((rank + 1) * mean).abs_()  # (C + 1,)
        cuts = (inside[light].flip(0) & (h < local)).long() + (inside[heavy].flip(0) & (h > 0)).long()
        ok = miss <= slack
        if bool(ok.any()):
            fewest = cuts.masked_fill(~ok, 3).min()
            miss = miss.masked_fill(~ok | (cuts != fewest), float("inf"))
        pick = int(miss.argmin())  # h[pick] == pick
        runs += [(light_lo, light_lo + local - pick, rank), (heavy_hi - pick, heavy_hi, rank)]
        works[rank] = taken[pick]
        done += int(taken[pick])
        light_lo += local - pick
        heavy_hi -= pick
    runs.append((light_lo, heavy_hi, cp - 1))  # 3. the rest: last rank
    works[cp - 1] = int(flat_prefix[-1]) - done
    return _expand(runs, flat_start, flat_src, seq_len), works


def _expand(
    runs: list[tuple[int, int, int]], flat_start: torch.Tensor, flat_src: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Flat runs ``(start, stop, rank)`` -> (S,) global positions, rank by rank, increasing within a rank."""
    runs = sorted(run for run in runs if run[1] > run[0])
    run_start = torch.tensor([run[0] for run in runs], dtype=torch.int64)  # (R,) they tile [0, S)
    run_rank = torch.tensor([run[2] for run in runs], dtype=torch.int64)
    # segments: stretches of the flat order inside one item and one run
    cuts = torch.unique(torch.cat([flat_start[:-1], run_start]))  # (G,) sorted
    seg_len = torch.diff(cuts, append=cuts.new_tensor([seq_len]))
    item = torch.searchsorted(flat_start, cuts, right=True) - 1
    seg_src = flat_src[item] + cuts - flat_start[item]  # natural start of each segment
    seg_rank = run_rank[torch.searchsorted(run_start, cuts, right=True) - 1]
    order = torch.argsort(seg_rank * seq_len + seg_src)  # by rank, then position
    seg_src, seg_len = seg_src[order], seg_len[order]
    seg_slot = seg_len.cumsum(0) - seg_len  # first slot of each segment
    shift = torch.repeat_interleave(seg_src - seg_slot, seg_len, output_size=seq_len)  # (S,)
    return shift.add_(torch.arange(seq_len, dtype=torch.int64))


def to_sequence_layout(layout: LayoutLike, cp: int, *, batch: int, seq_len: int) -> SequenceLayout:
    """``layout`` as a :class:`SequenceLayout` (named layouts repeated over ``batch`` rows), for comparisons."""
    validate_seq_len(seq_len, cp, layout)
    if isinstance(layout, SequenceLayout):
        return layout
    perm = layout_permutation(seq_len, cp, layout).expand(batch, seq_len).contiguous()
    return SequenceLayout(perm, cp, layout)


def _mask_rows(layout: SequenceLayout, mask: AttentionMask) -> None:
    ids = mask.document_ids
    if ids is not None and tuple(ids.shape) != (layout.batch, layout.seq_len):
        raise ValueError(
            f"mask.document_ids has shape {tuple(ids.shape)} but {layout!r} is for (B, S) = "
            f"({layout.batch}, {layout.seq_len}); build the mask and the layout from the same batch."
        )


def layout_work(layout: SequenceLayout, mask: AttentionMask) -> torch.Tensor:
    """(cp,) int64 attention work of each rank: visible (query, key) pairs of its queries, over all rows.

    Forward and backward cost are proportional to it; ``max / mean`` is the layout's imbalance.
    """
    _mask_rows(layout, mask)
    counts = mask.visible_counts(layout.seq_len).expand(layout.batch, layout.seq_len)  # (B, S)
    per_slot = counts.gather(1, layout.positions)  # (B, S) rank-concatenated
    return per_slot.view(layout.batch, layout.cp, -1).sum(dim=(0, 2))


def layout_crossing_kv_rows(layout: SequenceLayout, mask: AttentionMask) -> torch.Tensor:
    """(cp,) int64 KV rows each rank must receive: keys on other ranks that some of its queries see.

    Counts distinct (source rank, key, destination rank) triples, over all rows: a proxy for the
    communication a layout needs under ``mask`` (Note [Visible intervals]: the visible keys of a rank's
    queries, in increasing position order, are a union of intervals whose ends never decrease).
    """
    _mask_rows(layout, mask)
    batch, seq_len, cp = layout.batch, layout.seq_len, layout.cp
    lo, hi = (t.expand(batch, seq_len) for t in mask.intervals(seq_len))  # (B, S) each
    lo_r = lo.gather(1, layout.positions).view(batch, cp, -1)  # (B, cp, C)
    hi_r = hi.gather(1, layout.positions).view(batch, cp, -1)
    prev_hi = torch.cat([torch.full_like(hi_r[..., :1], -1), hi_r[..., :-1]], dim=-1)
    new_keys = (hi_r - torch.maximum(lo_r, prev_hi + 1) + 1).clamp_(min=0)  # keys not seen by earlier queries
    return (new_keys.sum(dim=-1) - seq_len // cp).sum(dim=0)  # every own key is visible to itself


def count_split_documents(layout: SequenceLayout, document_ids: torch.Tensor) -> int:
    """Number of documents (over all rows) whose tokens are on more than one rank."""
    if tuple(document_ids.shape) != (layout.batch, layout.seq_len):
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)} but {layout!r} is for (B, S) = "
            f"({layout.batch}, {layout.seq_len}); pass the batch the layout was built from."
        )
    batch, seq_len = layout.batch, layout.seq_len
    if seq_len == 0:
        return 0
    slot_rank = (torch.arange(seq_len) // (seq_len // layout.cp)).expand(batch, seq_len)
    owner = torch.empty(batch, seq_len, dtype=torch.int64).scatter_(1, layout.positions, slot_rank)
    ids = document_ids.cpu()
    is_start = torch.ones(batch, seq_len, dtype=torch.bool)
    is_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    doc = (is_start.view(-1).cumsum(0) - 1).view(batch, seq_len)  # (B, S) document index over all rows
    n_docs = int(doc[-1, -1]) + 1
    low = torch.full((n_docs,), layout.cp).scatter_reduce_(0, doc.view(-1), owner.view(-1), "amin")
    high = torch.full((n_docs,), -1).scatter_reduce_(0, doc.view(-1), owner.view(-1), "amax")
    return int((low != high).sum())


@dataclass(frozen=True)
class BalancedLayoutRule(LayoutRule):
    """A layout *rule* for CP styles: ``rule(document_ids, cp)`` is the batch's balanced layout.

    Equal to :func:`balanced_layout` with the same mask: every row is planned on its own, so any subset of
    rows - a pipeline microbatch, an accumulation chunk - gets exactly the permutations the whole batch was
    sharded with. Give the rule to :func:`cp_dtensor.shard_batch` (which applies it to the batch) and to
    the :class:`~cp_dtensor.ContextParallel` style (``layout=rule``); the style checks every call's
    positions against it, so a batch sharded otherwise raises instead of attending wrongly.

    Note [Rule memo]
    ~~~~~~~~~~~~~~~~
    Every attention layer of a step applies the rule to the same document ids (the style plans from
    them). Planning 128K tokens takes 16-33 ms, so each rule object remembers its last layouts by the ids'
    content digest (``tensor_digest``: content-checked, Note [Digest memo]); a layout is a pure function of
    (ids, cp), so the memo changes no result.

    Attributes:
        is_causal, window_size: the mask the layout balances (for models mixing local and global layers,
            balance the global ones: the default).
    """

    is_causal: bool = True
    window_size: tuple[int, int] = (-1, -1)
    name: str = "balanced"
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __call__(self, document_ids: torch.Tensor, cp: int) -> SequenceLayout:
        """The layout of ``document_ids`` (B, S) over ``cp`` ranks, row by row."""
        key = (tensor_digest(document_ids), cp)
        layout = self._memo.get(key)
        if layout is None:
            layout = balanced_layout(document_ids, cp, is_causal=self.is_causal, window_size=self.window_size)
            if len(self._memo) >= 4:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = layout
        return layout

    def positions(self, document_ids: torch.Tensor, cp: int) -> torch.Tensor:
        """(B, S) positions of ``self(document_ids, cp)``, through a custom op (traceable by torch.compile)."""
        left, right = self.window_size
        return balanced_layout_positions(document_ids, cp, self.is_causal, left, right)


@functools.lru_cache(maxsize=16)
def _rule(is_causal: bool, left: int, right: int) -> BalancedLayoutRule:
    """One rule object per mask, so that its memo (Note [Rule memo]) serves every compiled call."""
    return BalancedLayoutRule(is_causal, (left, right))


@torch.library.custom_op("cp_dtensor::balanced_layout_positions", mutates_args=())
def balanced_layout_positions(
    document_ids: torch.Tensor, cp: int, is_causal: bool, left: int, right: int
) -> torch.Tensor:
    """(B, S) int64 positions of the balanced layout of ``document_ids`` (Note [Balanced layout])."""
    return _rule(is_causal, left, right)(document_ids, cp).positions.to(document_ids.device)


@balanced_layout_positions.register_fake
def _(document_ids, cp, is_causal, left, right):
    return document_ids.new_empty(document_ids.shape, dtype=torch.int64)
