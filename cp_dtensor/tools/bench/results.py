"""Raw measurements of one sequence length to per-variant metrics (the JSON ``results`` entries)."""

from __future__ import annotations

from typing import Any

from cp_dtensor.tools.bench.bars import SAVED_BAR, check_bars
from cp_dtensor.tools.bench.config import BenchConfig, dtype_from_name
from cp_dtensor.tools.bench.overlap import overlap_metrics
from cp_dtensor.tools.bench.theory import min_bytes_per_rank, torch_bytes_analytic
from cp_dtensor.tools.bench.timing import summarize
from cp_dtensor.tools.bench.variants import CP_KINDS, build_variants

__all__ = ["summarize_seq_len"]


def summarize_seq_len(cfg: BenchConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """Turn one sequence length's raw measurements into per-variant metrics and bar checks.

    Args:
        cfg: the run's configuration.
        raw: one entry of :func:`cp_dtensor.tools.bench.runner.run_cpu_benchmark`.

    Returns:
        The sequence length's minimum bytes, saved-bytes target, per-variant metrics and bar checks.
    """
    seq_len, cp, dtype = raw["seq_len"], cfg.cp, dtype_from_name(cfg.dtype)
    minimum = min_bytes_per_rank(
        batch=cfg.batch, kv_heads=cfg.kv_heads, seq_len=seq_len, head_dim=cfg.head_dim, cp=cp, dtype=dtype
    )
    s_local = seq_len // cp
    lse_bytes = cfg.batch * cfg.heads * s_local * 4
    verify, timing, overlap = raw["verify"], raw["timing"], raw["overlap"]
    single = summarize([r["wall"] for r in timing["sdpa_1thread"]])
    single_cpu = summarize([r["cpu"] for r in timing["sdpa_1thread"]])
    cp1_saved = verify["sdpa_1thread"]["saved_bytes"]
    saved_target = SAVED_BAR * cp1_saved / cp + lse_bytes
    variants: dict[str, Any] = {}
    for variant in build_variants(cp, cfg.causal):
        if variant.name not in timing or variant.name == "load_1min":
            continue
        wall = summarize([r["wall"] for r in timing[variant.name]])
        cpu = summarize([r["cpu"] for r in timing[variant.name]])
        ranks = 1 if variant.kind == "sdpa" else cp
        m: dict[str, Any] = {
            "label": variant.label,
            "kind": variant.kind,
            "layout": variant.layout if variant.kind != "sdpa" else None,
            "comm": variant.comm or None,
            "threads_total": variant.threads if variant.kind == "sdpa" else cp,
            "time_s": wall.as_dict(),
            "speedup": single.median / wall.median,
            "efficiency": single.median / (cp * wall.median),
            "efficiency_best": single.min / (cp * wall.min),
            "cpu_s_all_ranks": cpu.as_dict(),
            "cpu_ratio_vs_single": cpu.median / single_cpu.median,
            "preempted_per_step": summarize([r["preempted"] for r in timing[variant.name]]).median,
            "ranks": ranks,
        }
        v = verify.get(variant.name, {})
        if "max_abs_diff_vs_sdpa" in v:
            m["max_abs_diff_vs_sdpa"] = v["max_abs_diff_vs_sdpa"]
        if "max_abs_diff_vs_cpd_p2p_zigzag" in v:
            m["max_abs_diff_vs_cpd_p2p_zigzag"] = v["max_abs_diff_vs_cpd_p2p_zigzag"]
        if variant.kind == "sdpa" and "saved_bytes" in v:
            m["saved_bytes_per_rank"] = v["saved_bytes"]
        if variant.kind in CP_KINDS:
            pr = v["per_rank"]
            fwd = max(r["bytes_forward"] for r in pr)
            bwd = max(r["bytes_backward"] for r in pr)
            work_f = [r["work_forward"] for r in pr]
            work_b = [r["work_backward"] for r in pr]
            saved = max(r["saved_bytes"] for r in pr)
            m.update(
                bytes_forward_per_rank=fwd,
                bytes_backward_per_rank=bwd,
                bytes_forward_vs_min=fwd / minimum["forward"],
                bytes_backward_vs_min=bwd / minimum["backward"],
                bytes_source=pr[0]["bytes_source"],
                bytes_per_rank_all=[(r["bytes_forward"], r["bytes_backward"]) for r in pr],
                work_forward_per_rank=work_f,
                work_backward_per_rank=work_b,
                work_forward_max_over_mean=max(work_f) / (sum(work_f) / len(work_f)),
                work_backward_max_over_mean=max(work_b) / (sum(work_b) / len(work_b)),
                kernel_calls_forward=pr[0]["kernel_calls_forward"],
                kernel_calls_backward=pr[0]["kernel_calls_backward"],
                saved_bytes_per_rank=saved,
                saved_bytes_vs_target=saved / saved_target,
            )
            if variant.kind == "torch":
                m["bytes_analytic"] = torch_bytes_analytic(cp, minimum["kv_shard"], minimum["dkv_shard"])
            if variant.name in overlap:
                m["overlap"] = o = overlap_metrics(overlap[variant.name])
                if o["cpu_d_serial_s"] is not None:
                    m["cpu_breakdown_s"] = _cpu_breakdown(
                        o, single_cpu.median, cpu.median, summarize(overlap["sdpa_1thread_cpu"]).median
                    )
        variants[variant.name] = m
    result = {
        "seq_len": seq_len,
        "s_local": s_local,
        "min_bytes_per_rank": minimum,
        "lse_bytes_per_rank": lse_bytes,
        "cp1_saved_bytes": cp1_saved,
        "saved_bytes_target_per_rank": saved_target,
        "head_tail_equals_zigzag": verify["head_tail_equals_zigzag"],
        "load_1min_during_timing": timing.get("load_1min", []),
        "variants": variants,
        "profile": raw.get("profile", {}),
        "bench_seconds": raw.get("bench_seconds"),
    }
    result["checks"] = check_bars(cfg, result)
    return result


def _cpu_breakdown(
    overlap: dict[str, Any], single_cpu_s: float, total_cpu_s: float, single_cpu_overlap_phase_s: float
) -> dict[str, float]:
    """Where the CPU seconds of all ranks go: ring compute, communication, the rest (contention).

    The serial ring compute (d) was measured in the overlap phase; divided by the single process measured
    next to it and multiplied by the timing phase's single process, it is scaled to the timing phase.
    """
    serial, comm = overlap["cpu_d_serial_s"]["median"], overlap["cpu_c_s"]["median"]
    ring = serial / single_cpu_overlap_phase_s * single_cpu_s  # scaled to the timing phase
    return {
        "single_process": single_cpu_s,
        "single_process_overlap_phase": single_cpu_overlap_phase_s,
        "ring_compute_serial_overlap_phase": serial,
        "ring_compute_ratio": serial / single_cpu_overlap_phase_s,
        "ring_compute": ring,
        "communication": comm,
        "rest_contention": total_cpu_s - ring - comm,
        "total_all_ranks": total_cpu_s,
    }
