"""Markdown report of the CPU benchmark: one block of tables per sequence length, and table helpers.

Per sequence length: time and efficiency; bytes, saved memory and work balance; hidden communication;
where the CPU seconds go; the bars; the optional profile; load and preemption figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cp_dtensor.tools.bench.config import BenchConfig
from cp_dtensor.tools.bench.variants import CP_KINDS

__all__ = ["format_bytes", "markdown_table", "render_tables"]


def format_bytes(n: float) -> str:
    """Human-readable bytes with binary prefixes (``16.0 MiB``)."""
    if n != n:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table with the columns padded for reading in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def render_tables(cfg: BenchConfig, res: dict[str, Any]) -> str:
    """Markdown tables (time, communication/memory/work, overlap, checks) of one sequence length.

    Args:
        cfg: the run's configuration.
        res: one entry of :func:`cp_dtensor.tools.bench.results.summarize_seq_len`.
    """
    vs = res["variants"]
    lines = [f"### S = {res['seq_len']} (S_local = {res['s_local']}, CP = {cfg.cp})", ""]
    lines += _time_table(vs, cfg.cp)
    lines += _minimum_note(res)
    lines += _bytes_memory_work_table(vs)
    lines += _overlap_table(vs)
    lines += _cpu_breakdown_table(vs)
    lines += _bars_table(res["checks"])
    lines += _profile_table((res.get("profile") or {}).get("per_rank"))
    lines += _footer(res, cfg.cp)
    return "\n".join(lines)


def _fmt_diff(m: dict[str, Any], key: str) -> str:
    d = m.get(key)
    return f"{max(d.values()):.1e}" if d else "-"


def _time_table(vs: dict[str, Any], cp: int) -> list[str]:
    """Step time, spread, speedup, efficiency, CPU seconds and max|diff| vs SDPA of every variant."""
    rows = []
    for name, m in vs.items():
        t, c = m["time_s"], m["cpu_s_all_ranks"]
        rows.append(
            [
                name,
                m["label"],
                m["threads_total"],
                f"{t['median']:.4f}",
                f"{t['min']:.4f}-{t['max']:.4f}",
                f"{t['q1']:.4f}-{t['q3']:.4f}",
                f"{m['speedup']:.3f}",
                f"{m['efficiency']:.3f}",
                f"{m['efficiency_best']:.3f}",
                f"{c['median']:.3f}",
                f"{m['cpu_ratio_vs_single']:.3f}",
                _fmt_diff(m, "max_abs_diff_vs_sdpa"),
            ]
        )
    return [
        markdown_table(
            [
                "variant",
                "description",
                "threads",
                "median s",
                "min-max s",
                "IQR s",
                "speedup",
                f"efficiency (T1/({cp}xT))",
                "eff. of minima",
                "CPU s all ranks",
                "CPU / single",
                "max|diff| vs SDPA",
            ],
            rows,
        )
    ]


def _minimum_note(res: dict[str, Any]) -> list[str]:
    """The communication minimum and the saved-bytes target in words."""
    mn = res["min_bytes_per_rank"]
    return [
        "",
        f"Communication minimum per rank: forward {format_bytes(mn['forward'])} ((CP-1) x K+V shard), backward "
        f"{format_bytes(mn['backward'])} (same KV + (CP-1) x fp32 dK/dV shard). Saved-bytes target per rank: "
        f"1.05 x CP1/CP + lse = {format_bytes(res['saved_bytes_target_per_rank'])} "
        f"(CP=1 saves {format_bytes(res['cp1_saved_bytes'])}).",
        "",
    ]


def _bytes_memory_work_table(vs: dict[str, Any]) -> list[str]:
    """Bytes sent vs the minimum, saved bytes vs the target, work max/mean of every CP variant."""
    rows = []
    for name, m in vs.items():
        if m["kind"] not in CP_KINDS:
            continue
        rows.append(
            [
                name,
                format_bytes(m["bytes_forward_per_rank"]),
                f"{m['bytes_forward_vs_min']:.4f}",
                format_bytes(m["bytes_backward_per_rank"]),
                f"{m['bytes_backward_vs_min']:.4f}",
                "AttentionStats" if m["kind"] == "cpd" else "counted",
                format_bytes(m["saved_bytes_per_rank"]),
                f"{m['saved_bytes_vs_target']:.3f}",
                f"{m['work_forward_max_over_mean']:.4f}",
                f"{m['work_backward_max_over_mean']:.4f}",
                f"{m['kernel_calls_forward']}/{m['kernel_calls_backward']}",
                _fmt_diff(m, "max_abs_diff_vs_cpd_p2p_zigzag"),
            ]
        )
    return [
        markdown_table(
            [
                "variant",
                "fwd bytes/rank",
                "/min",
                "bwd bytes/rank",
                "/min",
                "bytes from",
                "saved/rank",
                "/target",
                "work max/mean fwd",
                "bwd",
                "kernel calls f/b",
                "max|diff| vs cpd_p2p_zigzag",
            ],
            rows,
        )
    ]


def _overlap_table(vs: dict[str, Any]) -> list[str]:
    """Hidden communication (Note [Hidden communication]) of every CP variant that measured it."""
    lines: list[str] = []
    rows = []
    for name, m in vs.items():
        o = m.get("overlap")
        if not o:
            continue
        e = o["exposed_a_minus_b_s"]
        rows.append(
            [
                name,
                f"{o['a_real_s']['median']:.4f}",
                f"{o['b_local_copies_s']['median']:.4f}",
                f"{o['c_comm_only_s']['median']:.4f}",
                f"{e['median']:+.4f} [{e['q1']:+.4f}, {e['q3']:+.4f}]",
                f"{o['hidden_fraction']:.2f}" + (" (noisy)" if o["exposed_spread_exceeds_comm"] else ""),
                f"{o['wait_s']['median']:.4f}",
                f"{o['hidden_fraction_from_wait']:.2f}",
                f"{o['cpu_a_s']['median']:.3f} / {o['cpu_b_s']['median']:.3f} / {o['cpu_c_s']['median']:.3f}",
            ]
        )
    if rows:
        lines += [
            "",
            "Hidden communication (Note [Hidden communication] in cp_dtensor/tools/bench/overlap.py): "
            "a = real ring, b = same compute with every transfer replaced by a local copy, c = the same messages alone; "
            "hidden = 1 - median(a - b) / c, clipped to [0, 1] ('noisy' when the IQR of a - b exceeds c). "
            "wait = time blocked in communication during a; hidden_wait = 1 - wait / c. "
            "CPU a/b/c = CPU seconds of all ranks in a, b, c (c: what the communication itself costs in CPU).",
            "",
            markdown_table(
                [
                    "variant",
                    "a real s",
                    "b local-copy s",
                    "c comm-only s",
                    "a-b median [IQR]",
                    "hidden",
                    "wait s",
                    "hidden (wait)",
                    "CPU a / b / c s",
                ],
                rows,
            ),
        ]
    return lines


def _cpu_breakdown_table(vs: dict[str, Any]) -> list[str]:
    """Where the CPU seconds of all ranks go, for the cp_dtensor variants."""
    lines: list[str] = []
    rows = []
    for name, m in vs.items():
        b = m.get("cpu_breakdown_s")
        if not b:
            continue
        single = b["single_process"]
        rows.append(
            [
                name,
                f"{single:.3f}",
                f"{b['ring_compute_serial_overlap_phase']:.3f} / {b['single_process_overlap_phase']:.3f} "
                f"= {b['ring_compute_ratio']:.3f}",
                f"{b['ring_compute']:.3f} ({100 * (b['ring_compute'] / single - 1):+.1f}%)",
                *(
                    f"{b[key]:.3f} ({100 * b[key] / single:+.1f}%)"
                    for key in ("communication", "rest_contention")
                ),
                f"{b['total_all_ranks']:.3f} ({100 * (b['total_all_ranks'] / single - 1):+.1f}%)",
            ]
        )
    if rows:
        lines += [
            "",
            "Where the CPU seconds of all ranks go (medians). Ring compute: every rank's ring run one after "
            "the other on rank 0 with local copies (no communication, no oversubscription), divided by a "
            "single-process run made next to it (the machine's speed drifts between phases), times the "
            "timing phase's single process. Communication: CPU of c. Rest: total - both (contention: "
            "context switches and cache refills when ranks outnumber cores, gloo threads, barriers).",
            "",
            markdown_table(
                [
                    "variant",
                    "single s",
                    "serial ring / single (same phase)",
                    "ring compute s",
                    "communication s",
                    "rest s",
                    "total all ranks s",
                ],
                rows,
            ),
        ]
    return lines


def _bars_table(checks: list[dict[str, Any]]) -> list[str]:
    """The bars with measured value, target and PASS/FAIL/info."""
    if not checks:
        return []
    table = markdown_table(
        ["bar", "measured", "target", "result", "note"],
        [
            [
                c["bar"],
                f"{c['value']:.4f}",
                c["target"],
                {True: "PASS", False: "FAIL", None: "info"}[c["pass"]],
                c["note"],
            ]
            for c in checks
        ],
    )
    return ["", "Bars (cp_dtensor p2p zigzag):", "", table]


def _profile_table(profile_ranks: list[dict[str, Any]] | None) -> list[str]:
    """Per variant and rank: wall, kernel, other ops, wait, rest seconds and the top other ops."""
    if not profile_ranks:
        return []
    rows = []
    for vname in profile_ranks[0]:
        for rank, per in enumerate(profile_ranks):
            r = per[vname]
            top = ", ".join(
                f"{o['op'].split('::')[-1]} {o['self_s'] * 1e3:.0f}ms" for o in r["top_other_ops"][:4]
            )
            rows.append(
                [
                    vname,
                    rank,
                    f"{r['wall_s']:.3f}",
                    f"{r['kernel_s']:.3f}",
                    f"{r['other_ops_s']:.3f}",
                    f"{r['wait_s']:.3f}",
                    f"{r['rest_s']:.3f}",
                    top,
                ]
            )
    return [
        "",
        "Profile of one real-ring step per rank (torch.profiler self CPU time; wait = blocked in "
        "communication; rest = wall - kernel - other ops - wait: Python, autograd, scheduling):",
        "",
        markdown_table(
            ["variant", "rank", "wall s", "kernel s", "other ops s", "wait s", "rest s", "top other ops"],
            rows,
        ),
    ]


def _footer(res: dict[str, Any], cp: int) -> list[str]:
    """Head-tail == zigzag, the benchmark's wall time, load averages and preemptions."""
    loads = res["load_1min_during_timing"]
    preempted = {n: m["preempted_per_step"] for n, m in res["variants"].items()}
    return [
        f"\nhead-tail (PyTorch) chunk assignment == cp_dtensor zigzag: {res['head_tail_equals_zigzag']}; "
        f"benchmark wall time for this S: {res['bench_seconds']:.1f}s",
        f"1-min load average during the timed rounds: {', '.join(f'{x:.2f}' for x in loads)} "
        f"(this run's own ranks contribute up to {cp}); involuntary context switches per step (all ranks, "
        f"median): {', '.join(f'{n} {int(x)}' for n, x in preempted.items())}",
    ]
