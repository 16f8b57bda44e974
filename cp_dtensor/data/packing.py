"""Packing a token stream into training samples: fixed windows that carry their document boundaries.

Note [Packed documents]
~~~~~~~~~~~~~~~~~~~~~~~
Each document becomes ``[BOS] + tokens + [EOS]``; documents are concatenated in file order into one
stream, which is cut into windows of ``seq_len + 1`` tokens. Consecutive windows overlap by one token
(window i starts at ``i * seq_len``), so every token of the stream except the first is a label exactly
once. Sample i is ``tokens = window[:-1]``, ``labels = window[1:]``. A document longer than what is left of
a window continues in the next sample; nothing is dropped except the stream's last ``(N - 1) % seq_len``
labels, which do not fill a window. ``document_ids`` number the documents of a sample 0, 1, 2, ... along it
(a continued document starts the next sample with id 0); with ``reset_positions`` the positions restart
at 0 with each id (RoPE positions inside the document, as far as this sample holds it), else they are
``arange(seq_len)``. seq_len 8, documents a (6 tokens with BOS/EOS), b (7), c, ...::

                        sample 0            sample 1
    tokens              B a a a a E B b  |  b b b b E B c c      (B = BOS, E = EOS)
    document_ids        0 0 0 0 0 0 1 1  |  0 0 0 0 0 1 1 1
    positions           0 1 2 3 4 5 6 7  |  0 1 2 3 4 5 6 7
    reset_positions     0 1 2 3 4 5 0 1  |  0 1 2 3 4 0 1 2

The label of a document's EOS is the next document's BOS; a model with the ``document_causal`` mask
predicts it from its own document, which ends there. The in-memory :class:`~cp_dtensor.data.TextDataset`
and the memory-mapped :class:`PackedTokenDataset` both build their samples with :func:`pack_window`, so
the same corpus gives the same samples either way.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from cp_dtensor.data.common import Sample, document_positions

__all__ = ["PackedTokenDataset", "TokenStream", "pack_window"]


def pack_window(window: torch.Tensor, starts: torch.Tensor, *, reset_positions: bool) -> Sample:
    """One sample from a window of ``seq_len + 1`` stream tokens (Note [Packed documents]).

    Args:
        window: (S + 1,) int64 token ids.
        starts: (K,) int64 offsets in ``[1, S)`` inside the window where a new document starts.
        reset_positions: Positions restart at 0 at each document start; else ``arange(S)``.

    Returns:
        ``{"tokens", "labels", "positions", "document_ids"}``, each (S,) int64.
    """
    seq_len = window.numel() - 1
    boundary = torch.zeros(seq_len, dtype=torch.int64)  # (S,) 1 where a document starts
    boundary[starts] = 1
    document_ids = boundary.cumsum(0)  # (S,) 0, 1, 2, ... along the sample
    positions = (
        document_positions(document_ids) if reset_positions else torch.arange(seq_len, dtype=torch.int64)
    )  # (S,)
    return {
        "tokens": window[:-1],  # (S,)
        "labels": window[1:],  # (S,)
        "positions": positions,  # (S,)
        "document_ids": document_ids,  # (S,)
    }


class TokenStream(Protocol):
    """A packed token stream with document starts, read by range (e.g. :class:`~cp_dtensor.data.TokenCache`).

    Attributes:
        num_tokens: Length of the stream.
        num_documents: Number of documents in it.
    """

    num_tokens: int
    num_documents: int

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def document_starts_between(self, low: int, high: int) -> np.ndarray: ...


class PackedTokenDataset:
    """Samples of ``seq_len`` tokens cut from a token stream (Note [Packed documents]), read on demand.

    Reading sample i touches only its ``seq_len + 1`` tokens and the document starts inside them, so memory
    does not depend on the stream's length.

    Args:
        stream: The token stream (e.g. a :class:`~cp_dtensor.data.TokenCache`).
        seq_len: Tokens per sample.
        reset_positions: Positions restart at 0 at each document start.

    Raises:
        ValueError: ``seq_len < 1`` or a stream shorter than one sample (``seq_len + 1`` tokens).
    """

    def __init__(self, stream: TokenStream, seq_len: int, *, reset_positions: bool = False) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if stream.num_tokens < seq_len + 1:
            raise ValueError(
                f"the corpus has {stream.num_tokens} tokens (BOS/EOS included), but one sample of "
                f"seq_len={seq_len} needs {seq_len + 1}; add text or lower seq_len"
            )
        self.stream = stream
        self.seq_len = seq_len
        self.reset_positions = reset_positions

    @property
    def num_tokens(self) -> int:
        """Length of the packed token stream."""
        return self.stream.num_tokens

    @property
    def num_documents(self) -> int:
        """Documents in the stream."""
        return self.stream.num_documents

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, index: int) -> Sample:
        """Sample ``index``: the window starting at ``index * seq_len``.

        Args:
            index: In ``[0, len(self))``.

        Returns:
            ``{"tokens", "labels", "positions", "document_ids"}``, each (seq_len,) int64.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a dataset of {len(self)} samples")
        start = index * self.seq_len
        window = torch.from_numpy(self.stream.read(start, start + self.seq_len + 1))  # (S + 1,)
        starts = self.stream.document_starts_between(start, start + self.seq_len) - start  # (K,)
        return pack_window(window, torch.from_numpy(starts), reset_positions=self.reset_positions)
