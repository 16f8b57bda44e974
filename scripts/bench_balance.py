#!/usr/bin/env python3
"""Report how :func:`cp_dtensor.balanced_layout` balances packed documents, what it cuts, and how fast it plans.

    python scripts/bench_balance.py                                  # B=1, S=128K, cp 8 and 16
    python scripts/bench_balance.py --seq-len 16384 --cp 4 8 --repeats 3

Prints a markdown table, one line per (workload, mask, cp):

- ``max/mean``: heaviest rank's attention work over the mean (``layout_work``), balanced vs zigzag;
- ``split``: documents on more than one rank, balanced vs zigzag;
- ``KV rows``: keys each rank must receive because some of its queries see them
  (``layout_crossing_kv_rows``, summed over ranks), balanced vs zigzag;
- ``ms``: the plan time of ``balanced_layout`` on one thread (median over repeats): wall clock and the
  thread's CPU time (the CPU time does not count waiting for a busy machine).

A report, not a test: nothing is asserted. Workloads (:func:`document_lengths`) are seeded and shared
with ``tests/test_balance.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.balance import (
    balanced_layout,
    count_split_documents,
    layout_crossing_kv_rows,
    layout_work,
    to_sequence_layout,
)

WORKLOADS = ("one", "lognormal", "pareto", "few_long", "short")
"""one: a single document; lognormal: ~S/128 documents, log-normal lengths (sigma 2); pareto: one document
of S/2 and Pareto (alpha 1.1, >= 16, <= S/8) lengths; few_long: ~4 log-normal documents around S/4;
short: uniform lengths 16 .. 256."""

MASKS: dict[str, tuple[bool, tuple[int, int]]] = {
    "causal": (True, (-1, -1)),
    "causal w4096": (True, (4095, 0)),
    "bidir": (False, (-1, -1)),
    "bidir w512": (False, (512, 512)),
}


def document_lengths(kind: str, seq_len: int, seed: int) -> list[int]:
    """Seeded document lengths of one packed row of ``seq_len`` tokens (see :data:`WORKLOADS`)."""
    gen = torch.Generator().manual_seed(seed)
    draws = 2 * seq_len // 16 + 64  # more than enough lengths >= 16 on average
    if kind == "one":
        return [seq_len]
    if kind == "lognormal":
        mean, sigma = seq_len / max(8, seq_len // 128), 2.0
        lengths = (torch.randn(draws, generator=gen, dtype=torch.float64) * sigma).add_(
            math.log(mean) - sigma**2 / 2
        )
        head: list[int] = []
        tail = lengths.exp().clamp(min=1).long().tolist()
    elif kind == "pareto":
        uniform = torch.rand(draws, generator=gen, dtype=torch.float64).clamp(min=1e-12)
        tail = (16 / uniform ** (1 / 1.1)).clamp(max=seq_len // 8).long().tolist()
        head = [seq_len // 2]
    elif kind == "few_long":
        lengths = (torch.randn(draws, generator=gen, dtype=torch.float64) * 0.5).add_(math.log(seq_len / 4))
        head, tail = [], lengths.exp().clamp(min=1).long().tolist()
    elif kind == "short":
        head, tail = [], torch.randint(16, 257, (draws,), generator=gen).tolist()
    else:
        raise ValueError(f"unknown workload {kind!r}; choose one of {WORKLOADS}.")
    out, total = list(head), sum(head)
    for length in tail:
        if total >= seq_len:
            break
        out.append(min(length, seq_len - total))
        total += out[-1]
    if kind == "pareto":  # the long document at a seeded place, not always first
        at = int(torch.randint(len(out), (1,), generator=gen))
        out = out[1 : at + 1] + out[:1] + out[at + 1 :]
    return out


def document_ids(lengths: list[int]) -> torch.Tensor:
    """(1, S) int64 ids: document k is a run of ``lengths[k]`` tokens with id k."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)


def _imbalance(work: torch.Tensor) -> float:
    work = work.double()
    return float(work.max() / work.mean())


def _plan_ms(ids: torch.Tensor, cp: int, is_causal: bool, window: tuple[int, int], repeats: int) -> tuple:
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        balanced_layout(ids, cp, is_causal=is_causal, window_size=window)
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--cp", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=5, help="plans timed per line (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seq_len = args.seq_len
    print(f"B=1, S={seq_len}, seed {args.seed}, torch {torch.__version__}, 1 thread")
    print()
    print(
        "| workload | docs | mask | cp | max/mean bal / zigzag | split bal / zigzag | KV rows bal / zigzag | ms wall / cpu |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    worst_ms = 0.0
    for kind in args.workloads:
        lengths = document_lengths(kind, seq_len, args.seed)
        ids = document_ids(lengths)
        for mask_name, (is_causal, window) in MASKS.items():
            mask = AttentionMask(is_causal, window, ids)
            for cp in args.cp:
                layout = balanced_layout(ids, cp, is_causal=is_causal, window_size=window)
                zigzag = to_sequence_layout("zigzag", cp, batch=1, seq_len=seq_len)
                wall, cpu = _plan_ms(ids, cp, is_causal, window, args.repeats)
                worst_ms = max(worst_ms, wall)
                print(
                    f"| {kind} | {len(lengths)} | {mask_name} | {cp} "
                    f"| {_imbalance(layout_work(layout, mask)):.4f} / {_imbalance(layout_work(zigzag, mask)):.4f} "
                    f"| {count_split_documents(layout, ids)} / {count_split_documents(zigzag, ids)} "
                    f"| {int(layout_crossing_kv_rows(layout, mask).sum())} / "
                    f"{int(layout_crossing_kv_rows(zigzag, mask).sum())} "
                    f"| {wall:.1f} / {cpu:.1f} |"
                )
    print()
    print(f"slowest plan (median wall): {worst_ms:.1f} ms")


if __name__ == "__main__":
    main()
