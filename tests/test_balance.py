"""balanced_layout (Note [Balanced layout]): work balance, layout invariants, kept documents, errors.

Single process and fast. Plan time is a report (``scripts/bench_balance.py``), not a timed test; here the
complexity is checked by counting the Python lines the planner runs, which must not grow with S.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import pytest
import torch

import cp_dtensor
import cp_dtensor.balance as balance
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.balance import (
    BalancedLayoutRule,
    balanced_layout,
    count_split_documents,
    layout_crossing_kv_rows,
    layout_work,
    to_sequence_layout,
)
from cp_dtensor.layout import (
    SequenceLayout,
    layout_permutation,
    shard_sequence_for_rank,
    unshard_sequence_from_shards,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench_balance.py"


def _load_bench() -> ModuleType:
    """The benchmark script as a module: its seeded workloads are the ones tested here (one home)."""
    spec = importlib.util.spec_from_file_location("bench_balance", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
MASKS: dict[str, tuple[bool, tuple[int, int]]] = bench.MASKS
S = 16384


def _ids(kind: str, seq_len: int = S, seed: int = 0) -> torch.Tensor:
    return bench.document_ids(bench.document_lengths(kind, seq_len, seed))


def _imbalance(work: torch.Tensor) -> float:
    work = work.double()
    return float(work.max() / work.mean())


def _segments(ids_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) of every document of one row, in natural order."""
    change = (ids_row[1:] != ids_row[:-1]).nonzero().view(-1) + 1
    bounds = [0, *change.tolist(), ids_row.numel()]
    return list(itertools.pairwise(bounds))


# ---------------------------------------------------------------------------------------------------------
# Balance


@pytest.mark.parametrize("cp", [8, 16])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("kind", bench.WORKLOADS)
@pytest.mark.parametrize("seed", [0, 1])
def test_work_is_balanced(kind: str, mask_name: str, cp: int, seed: int) -> None:
    """max / mean rank work <= 1.05 on long-tailed, few-long, short and single-document rows."""
    is_causal, window = MASKS[mask_name]
    ids = _ids(kind, seed=seed)
    layout = balanced_layout(ids, cp, is_causal=is_causal, window_size=window)
    imbalance = _imbalance(layout_work(layout, AttentionMask(is_causal, window, ids)))
    assert imbalance <= 1.05, (kind, mask_name, cp, imbalance)


@pytest.mark.parametrize("cp", [2, 4, 8, 16])
def test_one_causal_document_is_exactly_zigzag(cp: int) -> None:
    """One causal document: the plan pairs early and late chunks, the zigzag layout itself."""
    layout = balanced_layout(torch.zeros(1, 4096, dtype=torch.int64), cp)
    assert torch.equal(layout.positions[0], layout_permutation(4096, cp, "zigzag"))


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_one_document_is_at_least_as_balanced_as_zigzag(mask_name: str) -> None:
    is_causal, window = MASKS[mask_name]
    ids = torch.zeros(1, S, dtype=torch.int64)
    mask = AttentionMask(is_causal, window, ids)
    layout = balanced_layout(ids, 8, is_causal=is_causal, window_size=window)
    zigzag = to_sequence_layout("zigzag", 8, batch=1, seq_len=S)
    assert _imbalance(layout_work(layout, mask)) <= _imbalance(layout_work(zigzag, mask)) + 1e-9


def test_one_bidirectional_document_stays_contiguous() -> None:
    """Every token weighs the same: the plan that cuts least is the contiguous one."""
    layout = balanced_layout(torch.zeros(1, 4096, dtype=torch.int64), 8, is_causal=False)
    assert torch.equal(layout.positions[0], torch.arange(4096))


def test_rows_are_balanced_in_total() -> None:
    """B > 1: each row is planned on its own, and the totals per rank balance (step 5)."""
    ids = torch.cat([_ids(kind, 4096, seed) for seed, kind in enumerate(["lognormal", "pareto", "few_long"])])
    mask = AttentionMask(True, (-1, -1), ids)
    layout = balanced_layout(ids, 8)
    assert _imbalance(layout_work(layout, mask)) <= 1.05
    for row in range(3):
        one = SequenceLayout(layout.positions[row : row + 1].clone(), 8, "row")
        row_mask = AttentionMask(True, (-1, -1), ids[row : row + 1])
        assert _imbalance(layout_work(one, row_mask)) <= 1.05


def test_function_and_rule_give_the_same_layout_row_by_row() -> None:
    """Issue 25 item 2: balanced_layout and BalancedLayoutRule plan each row on its own and agree, so a batch
    sharded with one is attended correctly under the other, and any subset of rows (a microbatch) gets the
    rows of the whole batch's layout."""
    lengths = [[5, 40, 19], [1, 30, 2, 31], [64]]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    whole = balanced_layout(ids, 4)
    assert torch.equal(whole.positions, BalancedLayoutRule()(ids, 4).positions)
    for row in range(ids.shape[0]):
        alone = balanced_layout(ids[row : row + 1], 4)
        assert torch.equal(alone.positions[0], whole.positions[row])


@pytest.mark.parametrize("seed", [0, 2, 11, 41, 52])  # 2, 11, 41, 52: rows where zigzag beats every plan
def test_tiny_shards_are_never_worse_than_zigzag(seed: int) -> None:
    """Shards of 4 tokens, where token granularity rules: the plan falls back to zigzag if that is better
    (step 4)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (1, 64), generator=gen).sort(dim=1).values
    for is_causal, window in [(True, (-1, -1)), (True, (100, 0)), (False, (-1, -1)), (False, (16, 16))]:
        mask = AttentionMask(is_causal, window, ids)
        layout = balanced_layout(ids, 16, is_causal=is_causal, window_size=window)
        zigzag = to_sequence_layout("zigzag", 16, batch=1, seq_len=64)
        assert _imbalance(layout_work(layout, mask)) <= _imbalance(layout_work(zigzag, mask)) + 1e-9


def test_tolerance_zero_balances_tighter() -> None:
    ids = _ids("lognormal", 131072)
    mask = AttentionMask(True, (-1, -1), ids)
    exact = balanced_layout(ids, 8, tolerance=0.0)
    assert _imbalance(layout_work(exact, mask)) <= 1.005


# ---------------------------------------------------------------------------------------------------------
# Layout invariants


@pytest.mark.parametrize("cp", [1, 2, 3, 8])
def test_layout_invariants(cp: int) -> None:
    """Each rank holds S / cp positions of every row, increasing; every row is a permutation of range(S)."""
    seq_len = 48 * cp
    gen = torch.Generator().manual_seed(cp)
    ids = torch.randint(0, 6, (4, seq_len), generator=gen).sort(dim=1).values  # contiguous documents
    layout = balanced_layout(ids, cp, is_causal=True, window_size=(7, 0))
    assert layout.positions.shape == (4, seq_len) and layout.cp == cp and layout.name == "balanced"
    local = layout.positions.view(4, cp, seq_len // cp)
    assert bool((local[..., 1:] > local[..., :-1]).all())
    assert torch.equal(layout.positions.sort(dim=1).values, torch.arange(seq_len).expand(4, seq_len))


def test_layout_round_trips_through_shard_and_unshard() -> None:
    """The object works where a layout name does: sharding then unsharding gives the tensor back."""
    ids = _ids("lognormal", 2048).expand(2, 2048).clone()
    layout = balanced_layout(ids, 4)
    x = torch.randn(2, 3, 2048, 5)  # (B, H, S, D)
    shards = [shard_sequence_for_rank(x, rank, 4, 2, layout) for rank in range(4)]
    assert all(shard.shape == (2, 3, 512, 5) for shard in shards)
    assert torch.equal(shards[1][:, :, :, 0], x[:, :, :, 0].gather(2, _rank_index(layout, 1, 3)))
    assert torch.equal(unshard_sequence_from_shards(shards, 2, layout), x)


def _rank_index(layout: SequenceLayout, rank: int, heads: int) -> torch.Tensor:
    return layout.rank_positions(rank).unsqueeze(1).expand(-1, heads, -1)


def test_empty_sequence_and_one_rank() -> None:
    assert balanced_layout(torch.zeros(2, 0, dtype=torch.int64), 4).positions.shape == (2, 0)
    ids = _ids("short", 512)
    assert torch.equal(balanced_layout(ids, 1).positions[0], torch.arange(512))


def test_exported_from_package() -> None:
    assert cp_dtensor.balanced_layout is balanced_layout


# ---------------------------------------------------------------------------------------------------------
# What stays together


@pytest.mark.parametrize("cp", [4, 8, 16])
@pytest.mark.parametrize("kind", ["short", "lognormal"])
def test_documents_are_cut_only_at_run_ends(kind: str, cp: int) -> None:
    """Short documents stay whole unless one of the 2 (cp - 1) run ends lands in one (fewer than zigzag)."""
    ids = _ids(kind, 131072)
    layout = balanced_layout(ids, cp)
    zigzag = to_sequence_layout("zigzag", cp, batch=1, seq_len=131072)
    split = count_split_documents(layout, ids)
    assert split <= 2 * (cp - 1)
    assert split < count_split_documents(zigzag, ids)


def test_long_document_pieces_are_long_runs_under_a_window() -> None:
    """One long causal document, window 256: each rank holds at most two runs of it, so at most two
    window tails per rank cross ranks."""
    left, cp = 255, 8
    ids = torch.zeros(1, S, dtype=torch.int64)
    layout = balanced_layout(ids, cp, window_size=(left, 0))
    for rank in range(cp):
        pos = layout.rank_positions(rank)[0]
        runs = 1 + int((pos[1:] != pos[:-1] + 1).sum())
        assert runs <= 2
    crossing = layout_crossing_kv_rows(layout, AttentionMask(True, (left, 0), ids))
    assert bool((crossing <= 2 * left).all()), crossing


def test_bidirectional_whole_documents_need_no_kv_from_other_ranks() -> None:
    """Equal documents that tile the ranks exactly: no cut, no crossing KV row."""
    ids = torch.arange(16).repeat_interleave(256).unsqueeze(0)  # 16 documents of 256, cp 4: 4 per rank
    layout = balanced_layout(ids, 4, is_causal=False)
    assert count_split_documents(layout, ids) == 0
    assert int(layout_crossing_kv_rows(layout, AttentionMask(False, (-1, -1), ids)).sum()) == 0


# ---------------------------------------------------------------------------------------------------------
# The measures, against brute force


def _brute_force(layout: SequenceLayout, mask: AttentionMask, ids: torch.Tensor) -> tuple[list, list, int]:
    dense = mask.dense(layout.seq_len).expand(layout.batch, -1, -1)  # (B, S, S)
    owner = torch.empty_like(layout.positions)
    local = layout.seq_len // layout.cp
    for b in range(layout.batch):
        owner[b, layout.positions[b]] = torch.arange(layout.seq_len) // local
    work, crossing = [0] * layout.cp, [0] * layout.cp
    for b in range(layout.batch):
        for rank in range(layout.cp):
            queries = owner[b] == rank
            work[rank] += int(dense[b][queries].sum())
            seen = dense[b][queries].any(dim=0)
            crossing[rank] += int((seen & (owner[b] != rank)).sum())
    split = sum(
        len(set(owner[b, start:stop].tolist())) > 1
        for b in range(layout.batch)
        for start, stop in _segments(ids[b])
    )
    return work, crossing, split


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_measures_match_brute_force(mask_name: str) -> None:
    is_causal, window = MASKS[mask_name]
    window = tuple(min(w, 9) for w in window)  # windows that bite at this size
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (2, 96), generator=gen).sort(dim=1).values
    mask = AttentionMask(is_causal, window, ids)
    for layout in (balanced_layout(ids, 4, is_causal=is_causal, window_size=window), "zigzag", "contiguous"):
        layout = to_sequence_layout(layout, 4, batch=2, seq_len=96)
        work, crossing, split = _brute_force(layout, mask, ids)
        assert layout_work(layout, mask).tolist() == work
        assert layout_crossing_kv_rows(layout, mask).tolist() == crossing
        assert count_split_documents(layout, ids) == split


def test_measures_check_the_batch() -> None:
    layout = balanced_layout(torch.zeros(1, 64, dtype=torch.int64), 2)
    wrong = AttentionMask(True, (-1, -1), torch.zeros(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="build the mask and the layout from the same batch"):
        layout_work(layout, wrong)
    with pytest.raises(ValueError, match="pass the batch the layout was built from"):
        count_split_documents(layout, torch.zeros(1, 32, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------
# Complexity: Python steps do not grow with the number of tokens


def _python_lines(fn: Any) -> int:
    """Lines of cp_dtensor/balance.py that run during ``fn()``."""
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if frame.f_code.co_filename != balance.__file__:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("kind", ["one", "lognormal", "short"])
def test_plan_runs_no_python_per_token(kind: str) -> None:
    """A 128K-token row with ~1000 documents runs about as many Python lines as an 8K-token one: the
    work per token is in vectorized torch ops (the time itself is reported by scripts/bench_balance.py)."""
    small = _python_lines(lambda: balanced_layout(_ids(kind, 8192), 16))
    large_ids = _ids(kind, 131072)
    large = _python_lines(lambda: balanced_layout(large_ids, 16))
    assert large <= 2 * small + 200, (small, large)
    assert large < 5000


# ---------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("ids", "cp", "kwargs", "match"),
    [
        (torch.zeros(64, dtype=torch.int64), 2, {}, r"document_ids must be a \(B, S\) integer tensor"),
        (torch.zeros(1, 64), 2, {}, "document_ids must have an integer dtype"),
        (torch.tensor([[0, 0, 1, 1, 0, 0]]), 2, {}, "documents must be contiguous runs"),
        (torch.zeros(1, 60, dtype=torch.int64), 8, {}, r"not a multiple of cp=8.*Pad the packed batch .* 64"),
        (torch.zeros(1, 64, dtype=torch.int64), 0, {}, "cp must be an integer >= 1"),
        (torch.zeros(1, 64, dtype=torch.int64), 2.0, {}, "cp must be an integer >= 1"),
        (
            torch.zeros(1, 64, dtype=torch.int64),
            2,
            {"window_size": (-2, 0)},
            r"window_size must be \(left, right\)",
        ),
        (torch.zeros(1, 64, dtype=torch.int64), 2, {"is_causal": 1}, "is_causal must be True or False"),
        (
            torch.zeros(1, 64, dtype=torch.int64),
            2,
            {"tolerance": 1.0},
            r"tolerance must be a number in \[0, 1\)",
        ),
        ("not a tensor", 2, {}, r"document_ids must be a \(B, S\) integer tensor"),
    ],
)
def test_errors_name_the_argument_and_the_fix(ids: Any, cp: Any, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        balanced_layout(ids, cp, **kwargs)


def test_errors_come_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation runs first: a bad window is reported without computing a single token's work."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("work computed before validation")

    monkeypatch.setattr(balance.AttentionMask, "visible_counts", fail)
    with pytest.raises(ValueError, match="window_size"):
        balanced_layout(torch.zeros(1, 64, dtype=torch.int64), 2, window_size=(-3, 0))


# ---------------------------------------------------------------------------------------------------------
# The report script


def test_bench_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The report's main, in process (the script imports nothing else; a subprocess would only add torch's
    import time)."""
    bench.main(["--seq-len", "2048", "--cp", "2", "4", "--repeats", "1", "--workloads", "one", "short"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("| one", "| short"))]
    assert len(lines) == 2 * len(MASKS) * 2
    assert "| one | 1 | causal | 2 | 1.0000 / 1.0000 |" in out
