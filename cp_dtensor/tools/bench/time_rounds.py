"""Interleaved timed rounds of every variant: wall time (max over ranks), CPU seconds, preemptions.

Each round runs every variant once after a barrier; the order rotates by one each round, so no variant
always runs first or last, and machine noise hits every variant alike.
"""

from __future__ import annotations

import os
import resource
from typing import Any

import torch.distributed as dist

from cp_dtensor.tools.bench.rank_bench import RankBench
from cp_dtensor.tools.bench.timing import time_call

__all__ = ["time_variants"]


def time_variants(bench: RankBench) -> dict[str, Any]:
    """Warmup, then ``repeats`` interleaved rounds of every variant.

    Returns:
        Per variant and repeat: wall (max over ranks), cpu (sum over ranks) and ``preempted`` (the
        involuntary context switches of all ranks during the step: how often the OS took a core away),
        and under ``"load_1min"`` the machine's 1-minute load average at each timed round.
    """
    cfg = bench.cfg
    steps = {v.name: bench.make_step(v) for v in bench.variants if bench.runs_here(v)}
    local: dict[str, list[tuple[float, float, int]]] = {v.name: [] for v in bench.variants}
    loads: list[float] = []
    n = len(bench.variants)
    for rnd in range(cfg.warmup + cfg.repeats):
        order = bench.variants[rnd % n :] + bench.variants[: rnd % n]  # rotate: no fixed position bias
        for variant in order:
            with bench.threads(variant):
                dist.barrier(bench.group)
                if not bench.runs_here(variant):
                    continue
                switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
                wall, cpu = time_call(steps[variant.name])
                switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches
            if rnd >= cfg.warmup:
                local[variant.name].append((wall, cpu, switches))
        if rnd >= cfg.warmup:
            loads.append(os.getloadavg()[0])
    per_rank = [None] * bench.cp
    dist.all_gather_object(per_rank, local, group=bench.group)
    out: dict[str, Any] = {}
    for variant in bench.variants:
        rows = [r[variant.name] for r in per_rank if r[variant.name]]  # ranks that ran it
        out[variant.name] = [
            {
                "wall": max(r[i][0] for r in rows),
                "cpu": sum(r[i][1] for r in rows),
                "preempted": sum(r[i][2] for r in rows),
            }
            for i in range(len(rows[0]))
        ]
    out["load_1min"] = loads
    return out
