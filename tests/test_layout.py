"""Sequence layouts against an independent definition: which global positions each CP rank holds.

The expected positions are written here from the definition in words (Note [Sequence layouts]), without
calling ``cp_dtensor.layout``, so a layout bug that the sharding, the ring and the parity tests would all
share (they use the same layout code on every side) still fails here. Pure indexing: exact comparisons.
"""

from __future__ import annotations

import pytest
import torch

from cp_dtensor.layout import (
    layout_permutation,
    sequence_positions,
    shard_sequence_for_rank,
    unshard_sequence_from_shards,
)

CASES = [(8, 2), (24, 3), (32, 4), (48, 2), (64, 8), (40, 5)]  # (seq_len, cp)


def expected_positions(seq_len: int, rank: int, cp: int, layout: str) -> list[int]:
    """Positions ``rank`` holds, in increasing order, from the definition.

    contiguous: ``cp`` equal runs, rank r holds run r. zigzag: ``2 cp`` equal chunks of c = S / (2 cp);
    rank r holds the r-th chunk from the start and the r-th chunk from the end.
    """
    if layout == "contiguous":
        n = seq_len // cp
        return list(range(rank * n, (rank + 1) * n))
    c = seq_len // (2 * cp)
    head = list(range(rank * c, (rank + 1) * c))
    tail = list(range(seq_len - (rank + 1) * c, seq_len - rank * c))
    return head + tail


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("seq_len", "cp"), CASES, ids=lambda v: str(v))
def test_positions_and_permutation_match_the_definition(seq_len: int, cp: int, layout: str) -> None:
    want = [expected_positions(seq_len, r, cp, layout) for r in range(cp)]
    assert sorted(p for positions in want for p in positions) == list(range(seq_len))  # a partition
    for rank in range(cp):
        assert sequence_positions(seq_len, rank, cp, layout).tolist() == want[rank], rank
    assert layout_permutation(seq_len, cp, layout).tolist() == [p for positions in want for p in positions]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("seq_len", "cp"), CASES, ids=lambda v: str(v))
def test_shards_hold_the_defined_positions(seq_len: int, cp: int, layout: str) -> None:
    x = torch.arange(2 * 3 * seq_len * 4).view(2, 3, seq_len, 4)  # (B, H, S, D): every entry distinct
    shards = []
    for rank in range(cp):
        idx = torch.tensor(expected_positions(seq_len, rank, cp, layout))
        shard = shard_sequence_for_rank(x, rank, cp, 2, layout)
        assert torch.equal(shard, x[:, :, idx]), rank
        assert torch.equal(shard_sequence_for_rank(x[:, 0], rank, cp, 1, layout), x[:, 0, idx])  # (B, S, D)
        shards.append(shard)
    assert torch.equal(unshard_sequence_from_shards(shards, 2, layout), x)


@pytest.mark.parametrize(("seq_len", "cp"), CASES, ids=lambda v: str(v))
def test_zigzag_gives_every_rank_the_same_causal_work(seq_len: int, cp: int) -> None:
    # A query at position p attends to p + 1 keys under a causal mask; zigzag's promise is equal sums.
    work = [sum(p + 1 for p in sequence_positions(seq_len, r, cp, "zigzag").tolist()) for r in range(cp)]
    assert len(set(work)) == 1, work
    assert sum(work) == seq_len * (seq_len + 1) // 2
