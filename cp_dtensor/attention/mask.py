"""Attention masks CP serves exactly: causal / bidirectional, packed documents, sliding windows.

Note [Visible intervals]
~~~~~~~~~~~~~~~~~~~~~~~~
Every mask served here gives each query position i one contiguous interval of visible keys
``[lo(i), hi(i)]`` (global positions, inclusive)::

    lo(i) = max(doc_start(i), i - left)          left = -1: unbounded
    hi(i) = min(doc_end(i), i + right')          right' = 0 if causal, else right (-1: unbounded)

    documents  | a a a a | b b b | c c c c c |        window (left 2, causal)
    query 5 (b): keys 4..5 visible  -> [lo, hi] = [4, 5]  (doc b starts at 4, window would allow 3)

``lo`` and ``hi`` never decrease with i, and i itself is always visible. That monotone band is what the
masked schedule cuts into rectangles and triangles (Note [Masked pieces]) so that only visible pairs are
ever computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cp_dtensor.layout import tensor_digest

__all__ = ["AttentionMask", "validate_mask_inputs", "visible_intervals"]

UNBOUNDED = -1


def validate_mask_inputs(
    document_ids: torch.Tensor | None, window_size: tuple[int, int], *, batch: int, seq_len: int
) -> None:
    """Check document ids and window; ``ValueError`` naming the argument and the fix.

    Args:
        document_ids: (B, S) integer tensor in natural order, or None.
        window_size: ``(left, right)``, each >= -1 (-1 = unbounded).
        batch: the batch size of q.
        seq_len: the global sequence length.
    """
    if (
        not isinstance(window_size, tuple | list)
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= UNBOUNDED for w in window_size)
    ):
        raise ValueError(
            f"window_size must be (left, right) with integers >= -1 (-1 = unbounded), got {window_size!r}; "
            f"e.g. (4095, 0) for a causal sliding window of 4096 tokens."
        )
    if document_ids is None:
        return
    if not isinstance(document_ids, torch.Tensor) or document_ids.dim() != 2:
        raise ValueError(
            f"document_ids must be a (B, S) integer tensor for the global sequence, got "
            f"{type(document_ids).__name__} of shape {tuple(getattr(document_ids, 'shape', ()))}."
        )
    if document_ids.is_floating_point() or document_ids.is_complex() or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must have an integer dtype, got {document_ids.dtype}.")
    if tuple(document_ids.shape) != (batch, seq_len):
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)} but the attention call needs (B, S) = "
            f"({batch}, {seq_len}): the global (unsharded) sequence in natural order, the same on every CP rank."
        )
    ids = document_ids.cpu()
    runs = (ids[:, 1:] != ids[:, :-1]).sum(dim=1) + 1
    for b in range(batch):
        if seq_len and int(runs[b]) != int(torch.unique(ids[b]).numel()):
            raise ValueError(
                f"document_ids row {b}: a document id reappears after another document; documents must be "
                f"contiguous runs (give each packed document its own id, e.g. the cumulative count of BOS "
                f"tokens)."
            )


def visible_intervals(
    document_ids: torch.Tensor | None, seq_len: int, *, is_causal: bool, window: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``, each (B or 1, S) int64: the visible key interval of every query (Note [Visible intervals])."""
    pos = torch.arange(seq_len, dtype=torch.int64)
    left, right = window
    if document_ids is None:
        start = torch.zeros(1, seq_len, dtype=torch.int64)
        end = torch.full((1, seq_len), seq_len - 1, dtype=torch.int64)
    else:
        ids = document_ids.cpu()
        change = torch.ones(ids.shape, dtype=torch.bool)
        change[:, 1:] = ids[:, 1:] != ids[:, :-1]
        # start of the run holding i: the last change at or before i
        start = torch.where(change, pos, torch.zeros_like(pos)).cummax(dim=1).values
        last = torch.ones(ids.shape, dtype=torch.bool)
        last[:, :-1] = change[:, 1:]
        # end of the run: the first run end at or after i (flip, cummin on reversed positions)
        end_marks = torch.where(last, pos, torch.full_like(pos, seq_len - 1))
        end = end_marks.flip(1).cummin(dim=1).values.flip(1)
    lo = start if left == UNBOUNDED else torch.maximum(start, pos - left)
    reach = 0 if is_causal else right
    hi = end if reach == UNBOUNDED else torch.minimum(end, pos + reach)
    return lo, hi


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """The mask of one CP attention call: causal or not, optional packed documents, optional window.

    Attributes:
        is_causal: keys after the query are hidden.
        window: ``(left, right)`` as flash-attn's ``window_size``: key j is visible from query i only if
            ``i - left <= j <= i + right``; -1 means unbounded.
        document_ids: (B, S) int in natural order, identical on every rank; None: one document per row.
    """

    is_causal: bool
    window: tuple[int, int] = (UNBOUNDED, UNBOUNDED)
    document_ids: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        is_causal: bool,
        window_size: tuple[int, int] = (UNBOUNDED, UNBOUNDED),
        document_ids: torch.Tensor | None = None,
    ) -> AttentionMask:
        """The mask of a call's keyword arguments, the window checked (``ValueError`` naming the fix) and
        made a tuple; document ids are checked against the call's shapes later (``validate_mask_inputs``)."""
        validate_mask_inputs(None, window_size, batch=0, seq_len=0)
        return cls(bool(is_causal), (int(window_size[0]), int(window_size[1])), document_ids)

    @property
    def is_plain(self) -> bool:
        """No documents and no window: the unmasked-schedule case (plain causal or bidirectional)."""
        return self.document_ids is None and tuple(self.window) == (UNBOUNDED, UNBOUNDED)

    def intervals(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` (B or 1, S) of :func:`visible_intervals`."""
        return visible_intervals(
            self.document_ids, seq_len, is_causal=self.is_causal, window=tuple(self.window)
        )

    def visible_counts(self, seq_len: int) -> torch.Tensor:
        """(B or 1, S) number of visible keys of each query: its share of the attention work."""
        lo, hi = self.intervals(seq_len)
        return hi - lo + 1

    def dense(self, seq_len: int) -> torch.Tensor:
        """(B or 1, S, S) boolean mask, True = visible (for tests and single-process references only)."""
        lo, hi = self.intervals(seq_len)
        keys = torch.arange(seq_len)
        return (keys >= lo.unsqueeze(-1)) & (keys <= hi.unsqueeze(-1))

    def fingerprint(self) -> tuple:
        """A hashable summary of everything that changes the result (for caches and cross-rank checks)."""
        ids = None
        if isinstance(self.document_ids, torch.Tensor):
            ids = (
                tuple(self.document_ids.shape),
                str(self.document_ids.dtype),
                tensor_digest(self.document_ids),
            )
        elif self.document_ids is not None:
            ids = (type(self.document_ids).__name__,)
        return (bool(self.is_causal), tuple(self.window), ids)
