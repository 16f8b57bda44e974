"""Where the time of one real-ring step goes, per rank: attention kernels, other ops, waits, the rest."""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

from cp_dtensor.tools.bench.overlap import build_overlap_steps
from cp_dtensor.tools.bench.rank_bench import RankBench
from cp_dtensor.tools.bench.variants import CP_KINDS

__all__ = ["profile_real_ring"]

_KERNEL_OP = "scaled_dot_product_flash_attention_for_cpu"


def profile_real_ring(bench: RankBench) -> dict[str, Any]:
    """Profile one real-ring step of every CP variant on every rank.

    Runs the overlap measurement's (a) step (real communication, waits timed) once under
    ``torch.profiler``: kernel = self time of the CPU flash forward/backward ops; other ops = self time
    of every other aten op (merge, packing, accumulation, copies); wait = time blocked in
    communication; rest = wall - all of these (Python, autograd, scheduling).

    Returns:
        ``{"per_rank": [...]}``: for each rank, per variant, the seconds of each part and the top other ops.
    """
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for variant in (v for v in bench.variants if v.kind in CP_KINDS):
        step = build_overlap_steps(bench, variant)["a"]
        step()  # warm
        dist.barrier(bench.group)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            waits = step()
            wall = time.perf_counter() - t0
        rows = [
            (e.key, e.self_cpu_time_total / 1e6, e.count)
            for e in prof.key_averages()
            if e.key.startswith("aten::")  # c10d ops are communication: their time overlaps the waits
        ]
        kernel = sum(t for name, t, _ in rows if _KERNEL_OP in name)
        others = sorted((r for r in rows if _KERNEL_OP not in r[0]), key=lambda r: -r[1])
        other = sum(t for _, t, _ in others)
        out[variant.name] = {
            "wall_s": wall,
            "kernel_s": kernel,
            "other_ops_s": other,
            "wait_s": waits.get("wait", 0.0),
            "waits": waits,
            "rest_s": wall - kernel - other - waits.get("wait", 0.0),
            "top_other_ops": [{"op": n, "self_s": t, "calls": c} for n, t, c in others[:8]],
        }
    per_rank = [None] * bench.cp
    dist.all_gather_object(per_rank, out, group=bench.group)
    return {"per_rank": per_rank}
