"""How much communication the ring hides behind compute (see Note [Hidden communication]).

Note [Hidden communication]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Three timings of the same forward+backward, each the max over ranks after a barrier::

    a = compute + exposed comm        real ring (communication in flight while kernels run)
    b = compute                       same code, every transfer replaced by a local copy of the buffer
    c = comm                          the same messages in the same order, no compute at all

    exposed = a - b        hidden = 1 - exposed / c        clipped to [0, 1]

hidden = 1: the ring is as fast as if communication were free; hidden = 0: communication added its
full standalone time. ``a - b`` is a difference of two long noisy timings, so it is taken per repeat
(paired, interleaved) and the median is used; when the spread of ``a - b`` exceeds ``c`` the estimate
says little, and the report gives the spread next to it. A second, direct estimate uses the time the
ranks spent blocked waiting for transfers (``wait``): hidden_wait = 1 - wait / c.

cp_dtensor variants also get (d): the compute of *every* rank's ring run one after the other on rank 0
with local-copy transports (one thread; no communication, no oversubscription), whose CPU seconds compared
with the single process give the ring's own compute overhead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from cp_dtensor.attention.transport import DKV_TAG, KV_TAG, ProcessGroupTransport
from cp_dtensor.layout import shard_sequence_for_rank
from cp_dtensor.tools.bench.cpd_ring import cpd_comm_only, cpd_direct_step
from cp_dtensor.tools.bench.meters import CollectiveMeter, TimedTransport
from cp_dtensor.tools.bench.rank_bench import RankBench
from cp_dtensor.tools.bench.standins import LocalCollectivesMode, LocalCopyTransport
from cp_dtensor.tools.bench.timing import summarize, time_call
from cp_dtensor.tools.bench.torch_ring import (
    torch_cp_options,
    torch_ring_backward,
    torch_ring_forward,
    torch_rotater_comm_only,
)
from cp_dtensor.tools.bench.variants import CP_KINDS, Variant

__all__ = ["build_overlap_steps", "hidden_fraction", "measure_overlap", "overlap_metrics"]

OverlapStep = Callable[[], dict[str, float]]


def hidden_fraction(exposed_s: float, comm_s: float) -> float:
    """``1 - exposed / comm`` clipped to [0, 1] (see Note [Hidden communication]); NaN without comm."""
    if not comm_s > 0 or exposed_s != exposed_s:  # no communication, or NaN
        return float("nan")
    return min(1.0, max(0.0, 1.0 - exposed_s / comm_s))


def build_overlap_steps(bench: RankBench, variant: Variant) -> dict[str, OverlapStep]:
    """The steps a, b, c (and d for cp_dtensor) of ``variant``; each returns its waits (seconds) by kind.

    Args:
        bench: this rank's inputs.
        variant: a CP variant.

    Returns:
        ``{"a": real, "b": local copies, "c": communication only}`` and, for cp_dtensor, ``"d"``: every
        rank's ring one after the other (meant for rank 0 only).
    """
    loc = bench.local[variant.layout]
    q, k, v, dout = loc["q"], loc["k"], loc["v"], loc["dout"]
    causal, scale = bench.cfg.causal, bench.cfg.scale
    kv = torch.stack([k, v])  # (2, B, Hkv, S_local, D): what both rings send
    acc = torch.float64 if bench.dtype == torch.float64 else torch.float32
    dkv = torch.zeros(kv.shape, dtype=acc)  # dK/dV accumulators travel in fp32
    dkv_per_rank = torch.zeros((bench.cp, *kv.shape), dtype=acc) if variant.comm == "allgather" else dkv
    if variant.kind == "cpd":

        def real() -> dict[str, float]:
            transport = TimedTransport(bench.group)
            cpd_direct_step(variant, q, k, v, dout, transport, causal, scale)
            names = {
                f"tag{KV_TAG}": "wait_kv",
                f"tag{DKV_TAG}": "wait_dkv",
                "collective": "wait_collective",
            }
            return {"wait": transport.wait_seconds} | {
                names[kind]: s for kind, s in transport.wait_by_kind.items()
            }

        def local_copies() -> dict[str, float]:
            cpd_direct_step(variant, q, k, v, dout, LocalCopyTransport(bench.rank, bench.cp), causal, scale)
            return {}

        def comm_only() -> dict[str, float]:
            cpd_comm_only(variant, ProcessGroupTransport(bench.group), kv, dkv, dkv_per_rank)
            return {}

        shards = (
            [
                [
                    shard_sequence_for_rank(bench.full[n], r, bench.cp, 2, variant.layout)
                    for n in ("q", "k", "v", "dout")
                ]
                for r in range(bench.cp)
            ]
            if bench.rank == 0
            else []
        )

        def serial_compute() -> dict[str, float]:
            for r, (qr, kr, vr, dr) in enumerate(shards):
                cpd_direct_step(variant, qr, kr, vr, dr, LocalCopyTransport(r, bench.cp), causal, scale)
            return {}

        return {"a": real, "b": local_copies, "c": comm_only, "d": serial_compute}

    spec = bench.torch_spec(variant)
    kv_flat = torch.cat([k.flatten(), v.flatten()])  # PyTorch's rotaters send flat buffers
    dkv_flat = torch.zeros(kv_flat.numel(), dtype=torch.float32)

    def torch_step() -> None:
        out, lse = torch_ring_forward(q, k, v, spec)
        torch_ring_backward(dout, q, k, v, out, lse, spec)

    def torch_real() -> dict[str, float]:
        meter = CollectiveMeter(bench.rank)
        with meter:
            torch_step()
        return {"wait": meter.wait_seconds}

    def torch_local() -> dict[str, float]:
        with LocalCollectivesMode():
            torch_step()
        return {}

    def torch_comm() -> dict[str, float]:
        with torch_cp_options(spec.rotate_method, spec.load_balance):
            torch_rotater_comm_only(spec, kv_flat, dkv_flat)
        return {}

    return {"a": torch_real, "b": torch_local, "c": torch_comm}


def measure_overlap(bench: RankBench) -> dict[str, Any]:
    """Interleaved rounds of (a), (b), (c) (and (d)) for every CP variant; see Note [Hidden communication].

    Returns:
        Per variant, the series of a, b, c and wait (each the max over ranks per repeat), the CPU seconds
        of all ranks for a, b, c, rank 0's d, and each rank's own waits split by kind; under
        ``"sdpa_1thread_cpu"`` the CPU seconds of the single process run next to them.
    """
    cfg = bench.cfg
    cp_variants = [v for v in bench.variants if v.kind in CP_KINDS]
    fns = {v.name: build_overlap_steps(bench, v) for v in cp_variants}
    local: dict[str, dict[str, list[float]]] = {v.name: {} for v in cp_variants}
    single_step = bench.make_step(bench.variant("sdpa_1thread")) if bench.rank == 0 else None
    single_cpu: list[float] = []
    for rnd in range(cfg.warmup + cfg.overlap_repeats):
        dist.barrier(bench.group)
        if single_step is not None:  # the single process again, in this phase's machine conditions
            _, cpu = time_call(single_step)
            if rnd >= cfg.warmup:
                single_cpu.append(cpu)
        for variant in cp_variants:
            for what, fn in fns[variant.name].items():
                dist.barrier(bench.group)
                if what == "d" and bench.rank != 0:
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                extra = fn()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if rnd >= cfg.warmup:
                    rec = local[variant.name]
                    for key, value in ((what, wall), (f"cpu_{what}", cpu), *extra.items()):
                        rec.setdefault(key, []).append(value)
    per_rank = [None] * bench.cp
    dist.all_gather_object(per_rank, local, group=bench.group)
    out: dict[str, Any] = {}
    n = cfg.overlap_repeats
    for variant in cp_variants:
        recs = [r[variant.name] for r in per_rank]
        series: dict[str, Any] = {}
        for what in ("a", "b", "c", "wait"):
            series[what] = [max(r[what][i] for r in recs) for i in range(n)]
        for what in ("a", "b", "c"):  # CPU seconds of all ranks
            series[f"cpu_{what}"] = [sum(r[f"cpu_{what}"][i] for r in recs) for i in range(n)]
        if "d" in recs[0]:
            series["d_serial_s"], series["cpu_d"] = recs[0]["d"], recs[0]["cpu_d"]
        series["per_rank_waits"] = [{k: vals for k, vals in r.items() if k.startswith("wait")} for r in recs]
        out[variant.name] = series
    single_all = [None] * bench.cp
    dist.all_gather_object(single_all, single_cpu, group=bench.group)
    out["sdpa_1thread_cpu"] = single_all[0]
    return out


def overlap_metrics(series: dict[str, Any]) -> dict[str, Any]:
    """Summaries of one variant's a, b, c, wait series and the hidden fractions derived from them."""
    a, b, c, wait = (summarize(series[k]) for k in ("a", "b", "c", "wait"))
    exposed = summarize([x - y for x, y in zip(series["a"], series["b"])])
    return {
        "a_real_s": a.as_dict(),
        "b_local_copies_s": b.as_dict(),
        "c_comm_only_s": c.as_dict(),
        "exposed_a_minus_b_s": exposed.as_dict(),
        "wait_s": wait.as_dict(),
        "cpu_a_s": summarize(series["cpu_a"]).as_dict(),
        "cpu_b_s": summarize(series["cpu_b"]).as_dict(),
        "cpu_c_s": summarize(series["cpu_c"]).as_dict(),
        "cpu_d_serial_s": summarize(series["cpu_d"]).as_dict() if "cpu_d" in series else None,
        "hidden_fraction": hidden_fraction(exposed.median, c.median),
        "hidden_fraction_from_wait": hidden_fraction(wait.median, c.median),
        "exposed_spread_exceeds_comm": (exposed.q3 - exposed.q1) > c.median,
        "per_rank_waits": series.get("per_rank_waits", []),
    }
