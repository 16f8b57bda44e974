"""One untimed step per variant: outputs and gradients against SDPA, bytes sent, work, saved bytes.

cp_dtensor variants count with their :class:`~cp_dtensor.attention.transport.AttentionStats`; PyTorch's loop is counted
from outside (its ops wrapped in :class:`~.meters.CountingOp`, its collectives metered by
:class:`~.meters.CollectiveMeter`). Outputs are unsharded and compared on rank 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import cp_dtensor
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.layout import layout_permutation
from cp_dtensor.tools.bench.meters import CollectiveMeter, CountingOp, saved_bytes_during
from cp_dtensor.tools.bench.rank_bench import RankBench
from cp_dtensor.tools.bench.torch_ring import CPU_FLASH_BWD, CPU_FLASH_FWD, torch_head_tail_indices
from cp_dtensor.tools.bench.variants import Variant

__all__ = ["max_abs_diffs", "verify_variants"]

_COMPARED = ("out", "dq", "dk", "dv")


def max_abs_diffs(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Max abs difference (in fp64) of out, dq, dk, dv against ``ref``."""
    assert ref is not None
    return {n: (got[n].double() - ref[n].double()).abs().max().item() for n in _COMPARED}


def verify_variants(bench: RankBench) -> dict[str, Any]:
    """Run each variant once; gather outputs to rank 0 and compare; count bytes, work, saved bytes.

    Returns:
        Per variant: rank 0's record (diffs against SDPA and against cpd_p2p_zigzag) and ``per_rank``
        (every rank's counters); and ``head_tail_equals_zigzag`` (PyTorch's chunk order == ours).
    """
    results: dict[str, Any] = {}
    ref: dict[str, torch.Tensor] | None = None
    ours: dict[str, torch.Tensor] | None = None
    sdpa_ref = bench.variant("sdpa_1thread")
    if bench.rank == 0:
        q, k, v, dout = bench.leaves(sdpa_ref)
        saved: dict[str, int] = {}
        with saved_bytes_during(saved):
            out = bench.forward(sdpa_ref, q, k, v)
        out.backward(dout)
        ref = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        results["sdpa_1thread"] = {"saved_bytes": saved["bytes"], "saved_tensors": saved["tensors"]}
    dist.barrier(bench.group)
    for variant in bench.variants:
        if variant.kind == "sdpa":
            if variant.name != "sdpa_1thread" and bench.rank == 0:
                with bench.threads(variant):
                    q, k, v, dout = bench.leaves(variant)
                    out = bench.forward(variant, q, k, v)
                    out.backward(dout)
                got = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
                results[variant.name] = {"max_abs_diff_vs_sdpa": max_abs_diffs(got, ref)}
            dist.barrier(bench.group)
            continue
        rec = _verify_cp(bench, variant)
        q, k, v = rec.pop("_grads")
        got = {
            n: cp_dtensor.unshard_sequence(t.detach(), bench.mesh, 2, variant.layout)
            for n, t in (("out", rec.pop("_out")), ("dq", q), ("dk", k), ("dv", v))
        }
        if bench.rank == 0:
            rec["max_abs_diff_vs_sdpa"] = max_abs_diffs(got, ref)
            if ours is None and variant.name == "cpd_p2p_zigzag":
                ours = got
            if ours is not None:
                rec["max_abs_diff_vs_cpd_p2p_zigzag"] = max_abs_diffs(got, ours)
        results[variant.name] = rec
    per_rank = [None] * bench.cp
    dist.all_gather_object(per_rank, results, group=bench.group)
    merged: dict[str, Any] = {}
    for name in per_rank[0]:
        merged[name] = {**per_rank[0][name], "per_rank": [r.get(name, {}) for r in per_rank]}
        for r in merged[name]["per_rank"]:
            for key in ("max_abs_diff_vs_sdpa", "max_abs_diff_vs_cpd_p2p_zigzag"):
                r.pop(key, None)
    merged["head_tail_equals_zigzag"] = bool(
        torch.equal(
            torch_head_tail_indices(bench.seq_len, bench.cp),
            layout_permutation(bench.seq_len, bench.cp, "zigzag").to(torch.int64),
        )
    )
    return merged


def _verify_cp(bench: RankBench, variant: Variant) -> dict[str, Any]:
    """One step of a CP variant on this rank: its counters, output and gradients (``_out``, ``_grads``)."""
    q, k, v, dout = bench.leaves(variant)
    saved: dict[str, int] = {}
    rec: dict[str, Any] = {}
    if variant.kind == "cpd":
        stats = AttentionStats()
        with saved_bytes_during(saved):
            out = bench.forward(variant, q, k, v, stats=stats)
        out.backward(dout)
        rec.update(
            bytes_forward=stats.bytes_sent_forward,
            bytes_backward=stats.bytes_sent_backward,
            work_forward=stats.score_elements_forward,
            work_backward=stats.score_elements_backward,
            kernel_calls_forward=stats.kernel_calls_forward,
            kernel_calls_backward=stats.kernel_calls_backward,
            bytes_source="AttentionStats",
        )
    else:
        fwd_op, bwd_op = CountingOp(CPU_FLASH_FWD), CountingOp(CPU_FLASH_BWD)
        spec = bench.torch_spec(variant, fwd_op, bwd_op)
        meter = CollectiveMeter(bench.rank)
        with saved_bytes_during(saved), meter:
            out = bench.forward(variant, q, k, v, spec=spec)
        meter.phase = "backward"
        with meter:
            out.backward(dout)
        rec.update(
            bytes_forward=meter.bytes_by_phase.get("forward", 0),
            bytes_backward=meter.bytes_by_phase.get("backward", 0),
            collective_calls=meter.calls_by_phase,
            work_forward=fwd_op.elements,
            work_backward=bwd_op.elements,
            kernel_calls_forward=fwd_op.calls,
            kernel_calls_backward=bwd_op.calls,
            bytes_source="counted: functional collectives intercepted by a TorchDispatchMode",
        )
    rec.update(
        saved_bytes=saved["bytes"],
        saved_tensors=saved["tensors"],
        _out=out,
        _grads=(q.grad, k.grad, v.grad),
    )
    return rec
