#!/usr/bin/env python3
"""Recommend parallel degrees with the analytic cost model ``cp_dtensor.tools.planner`` (Note [Cost model]).

    # the seed's Figure 2 setting: 175B GPT, TP x CP mixes vs TP8 CP1 full recompute
    python scripts/plan.py --model gpt175b --seq 8192 16384 32768 65536 131072 --gpus 64 --hw h100
    python scripts/plan.py --model llama3_70b --seq 131072 --gpus 64 128 --hw h200

    # CPU scale: predictions for given parallel plans, and predicted vs measured from a calibration file
    python scripts/plan.py --model small --hw cpu --gpus 4 --seq 4096 --plans tp4+full tp2cp2 cp4
    python scripts/plan.py --hw cpu --gpus 4 --plans tp4+full tp2cp2 cp4 --calibrate-from results.json

    # the CP communication strategy (p2p / allgather / alltoall / hybrid) per sequence length and tp x cp
    python scripts/plan.py --strategies --model llama3_8b --hw h100 --seq 32768 131072 1048576 --cp 8 32

    # measure this machine (4 local gloo ranks, < 60 s) into a calibrated preset, then plan with it
    python scripts/plan.py --calibrate --out calib.json
    python scripts/plan.py --model small --hw calib.json --gpus 4 --seq 4096 --plans tp4+full tp2cp2 cp4

Prints markdown: per GPU count a "TP x CP" table (rows: mixes, columns: sequence lengths; each cell the
speedup over the baseline of the mix's best plan that fits, with its AC mode and pp when > 1; ** marks
the best plan of the column), then per (seq, GPUs) the top plans with their step-time breakdown and
memory. The calibration file format is Note [Calibration file] in ``cp_dtensor/tools/planner/calibration.py``;
``--hw`` takes a preset name or such a file (Note [Machine calibration] in ``.../planner/measure.py``).
``--layouts`` is the older name of ``--plans``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cp_dtensor.tools.planner import (
    GIB,
    HARDWARE_PRESETS,
    Calibration,
    Comparison,
    CostOptions,
    Estimate,
    Hardware,
    ModelShape,
    ParallelPlan,
    Recommendation,
    build_model_shape,
    choose_strategy,
    compare_measurements,
    format_ms,
    load_calibration,
    load_hardware,
    model_attention_problem,
    recommend,
)

DEFAULT_GLOBAL_BATCH_TOKENS = 4 * 2**20


def _parse_value(text: str) -> Any:
    """``KEY=VALUE`` values: JSON when it parses (numbers, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_assignments(items: Sequence[str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--{what} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _key(plan: ParallelPlan) -> tuple[int, int, int, int, str]:
    """A plan's identity without ``selective_every`` (the planner may change it)."""
    return plan.tp, plan.cp, plan.pp, plan.dp, plan.ac


def _fmt_seq(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def _fmt_bytes(x: float) -> str:
    return f"{x / GIB:.3g} GiB" if x >= GIB else f"{x / 2**20:.3g} MiB"


def _fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _speedup(rec: Recommendation, row: Estimate) -> str:
    s = rec.speedup(row)
    return "-" if s is None else f"{s:.2f}x"


def _mix_cell(rec: Recommendation, row: Estimate | None, best: bool) -> str:
    if row is None:
        return ""
    s = rec.speedup(row)
    pp = f" pp{row.plan.pp}" if row.plan.pp > 1 else ""
    text = f"{'-' if s is None else f'{s:.2f}'} {row.plan.ac_label}{pp}"
    return f"**{text}**" if best else text


def header(
    model: ModelShape, hw: Hardware, options: CostOptions, impl: str, args: argparse.Namespace
) -> list[str]:
    """Comment lines describing the inputs."""
    batch = (
        f"global batch {args.global_batch_tokens} tokens"
        if args.global_batch_tokens
        else f"{args.microbatches} micro-batch(es) per replica"
    )
    return [
        f"# python scripts/plan.py {' '.join(args.argv)}",
        f"# model {model.name}: {model.params / 1e9:.3g}e9 params, dim {model.dim}, {model.n_layers} layers, "
        f"heads {model.n_heads}/{model.n_kv_heads} kv, ffn {model.ffn_hidden} ({model.mlp}), vocab "
        f"{model.vocab_size}",
        f"# hardware {hw.name}: {hw.memory_bytes / GIB:.0f} GiB x {hw.memory_usable_fraction:g} usable, "
        f"{hw.peak_flops / 1e12:.4g} TFLOP/s peak x {hw.matmul_efficiency:g} matmul / "
        f"{hw.attention_efficiency:g} attention, links {hw.intra_node_bandwidth / 1e9:g} GB/s intra "
        f"({hw.devices_per_node}/node) / {hw.inter_node_bandwidth / 1e9:g} GB/s inter",
        f"# impl {impl}, dtype {options.dtype_bytes} bytes, tp_overlap {options.tp_overlap:g}, CP "
        f"{options.cp_layout} ring, {batch}, micro-batch {args.micro_batch}; FSDP over dp x cp",
    ]


def detail_table(rec: Recommendation, rows: Sequence[Estimate], *, with_reason: bool = False) -> list[str]:
    """Markdown rows: breakdown and memory of each estimate."""
    cols = [
        "#",
        "layout",
        "step s",
        "tok/s/GPU",
        "MFU",
        "matmul s",
        "attn s",
        "recompute s",
        "TP exposed s",
        "CP exposed/comm s",
        "PP bubble s",
        "FSDP exposed s",
        "act GiB",
        "peak GiB",
        "fits",
        "vs baseline",
    ]
    n_numeric = len(cols) - 4
    if with_reason:
        cols.append("note")
    unit, scale = ("GiB", GIB) if any(e.peak_bytes >= GIB for e in rows) else ("MiB", 2.0**20)
    cols = [c.replace("GiB", unit) for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, e in enumerate(rows, 1):
        if e.tokens_per_s <= 0:  # invalid plan: nothing was priced
            cells = [str(i), e.plan.label] + [""] * n_numeric + ["no", ""]
        else:
            cells = [
                str(i),
                e.plan.label,
                _fmt_s(e.step_time_s),
                f"{e.tokens_per_s_per_device:.4g}",
                f"{e.mfu:.1%}",
                _fmt_s(e.matmul_s),
                _fmt_s(e.attention_s),
                _fmt_s(e.recompute_s),
                _fmt_s(e.tp_exposed_s),
                f"{_fmt_s(e.cp_exposed_s)}/{_fmt_s(e.cp_comm_s)}",
                _fmt_s(e.pp_bubble_s),
                _fmt_s(e.fsdp_exposed_s),
                f"{e.activation_bytes / scale:.3g}",
                f"{e.peak_bytes / scale:.3g}",
                "yes" if e.fits else "no",
                _speedup(rec, e),
            ]
        if with_reason:
            cells.append(e.reason)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mix_table(recs: dict[int, Recommendation], n_gpus: int, baseline_label: str) -> list[str]:
    """Figure-2-style table: TP x CP mixes (rows) vs sequence lengths (columns)."""
    seqs = sorted(recs)
    mixes: set[tuple[int, int]] = set()
    for rec in recs.values():
        mixes.update((e.plan.tp, e.plan.cp) for e in [*rec.rows, *rec.rejected])
    lines = [
        f"## Speedup over {baseline_label} by TP x CP mix, {n_gpus} GPUs",
        "",
        "Each cell: the mix's fastest layout that fits (speedup, AC mode, pp if > 1); "
        "empty: nothing fits (mixes where nothing ever fits are left out); ** best of the column; "
        "(OOM): the baseline itself does not fit (its estimated time is still the reference).",
        "",
        "| TP x CP | " + " | ".join(_fmt_seq(s) for s in seqs) + " |",
        "|" + "---|" * (len(seqs) + 1),
    ]
    base_row = ["baseline " + baseline_label]
    for s in seqs:
        b = recs[s].baseline
        base_row.append("" if b is None else ("1.00" if b.fits else "1.00 (OOM)"))
    lines.append("| " + " | ".join(base_row) + " |")
    for tp, cp in sorted(mixes, key=lambda m: (-m[0], m[1])):
        if not any(any((e.plan.tp, e.plan.cp) == (tp, cp) for e in rec.rows) for rec in recs.values()):
            continue  # no plan of this mix fits at any length
        cells = [f"TP{tp} CP{cp}"]
        for s in seqs:
            rec = recs[s]
            row = next((e for e in rec.rows if (e.plan.tp, e.plan.cp) == (tp, cp)), None)
            cells.append(_mix_cell(rec, row, best=row is not None and row is rec.best))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_table(comparisons: Sequence[Comparison]) -> list[str]:
    """Predicted vs measured step time and activation bytes with relative errors."""
    lines = [
        "| layout | seq | predicted step s | measured step s | error | predicted act MiB | "
        "measured act MiB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def err(x: float | None) -> str:
        return "" if x is None else f"{x:+.1%}"

    def val(x: float | None, scale: float = 1.0) -> str:
        return "" if x is None else f"{x / scale:.4g}"

    for c in comparisons:
        m, e = c.measurement, c.estimate
        valid = e.tokens_per_s > 0
        lines.append(
            f"| {m.plan.label} | {m.seq_len} | {val(e.step_time_s) if valid else e.reason} | "
            f"{val(m.step_time_s)} | {err(c.step_time_error)} | "
            f"{val(e.activation_bytes, 2**20) if valid else ''} | {val(m.activation_bytes, 2**20)} | "
            f"{err(c.activation_error)} |"
        )
    errors = [abs(c.step_time_error) for c in comparisons if c.step_time_error is not None]
    act_errors = [abs(c.activation_error) for c in comparisons if c.activation_error is not None]
    if errors or act_errors:
        lines.append("")
        lines.append(
            "mean |error|: "
            + (f"step time {sum(errors) / len(errors):.1%}" if errors else "step time -")
            + (f", activations {sum(act_errors) / len(act_errors):.1%}" if act_errors else "")
        )
    return lines


def _strategy_cell(row: Any) -> str:
    """A strategy's predicted ms, or "-" when it cannot run."""
    return "-" if row is None or not row.valid else format_ms(row.time_s)


def strategy_table(
    model: ModelShape,
    seqs: Sequence[int],
    tps: Sequence[int],
    cps: Sequence[int],
    hw: Hardware,
    dtype_bytes: int,
) -> list[str]:
    """Markdown: per (seq, tp, cp) the CP strategy the cost model picks (Note [CP strategy cost]), the
    predicted fwd+bwd time per attention layer of each strategy, and the reason."""
    lines = [
        "| seq | tp x cp | choice | p2p ms | allgather ms | alltoall ms | best hybrid ms | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seq in seqs:
        for tp in tps:
            for cp in cps:
                if cp < 2 or model.n_heads % tp:
                    continue
                problem = model_attention_problem(model, seq, cp, tp, dtype_bytes=dtype_bytes)
                best, rows = choose_strategy(problem, hw)
                by = {r.comm: r for r in rows if r.comm != "hybrid"}
                hybrids = [r for r in rows if r.comm == "hybrid" and r.valid]
                hyb = min(hybrids, key=lambda r: r.time_s) if hybrids else None

                hyb_cell = "-" if hyb is None else f"{_strategy_cell(hyb)} (k={hyb.a2a_size})"
                why = best.reason.split(": ", 1)[1]
                lines.append(
                    f"| {_fmt_seq(seq)} | {tp} x {cp} | **{best.label}** | {_strategy_cell(by['p2p'])} | "
                    f"{_strategy_cell(by['allgather'])} | {_strategy_cell(by.get('alltoall'))} | {hyb_cell} | {why} |"
                )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="gpt175b, llama3_8b, llama3_70b, debug, small, ...")
    p.add_argument("--seq", type=int, nargs="+", default=None, help="global sequence lengths")
    p.add_argument(
        "--gpus",
        type=int,
        nargs="+",
        default=None,
        help="numbers of devices (default 64, or the world sizes of the calibration measurements)",
    )
    p.add_argument(
        "--hw",
        default="h100",
        help=f"hardware preset ({', '.join(sorted(HARDWARE_PRESETS))}) or a calibrated preset file written "
        "by --calibrate",
    )
    p.add_argument("--hw-set", nargs="*", default=[], metavar="KEY=VALUE", help="override Hardware fields")
    p.add_argument("--opt-set", nargs="*", default=[], metavar="KEY=VALUE", help="override CostOptions")
    p.add_argument(
        "--impl",
        choices=["megatron", "cp_dtensor"],
        default=None,
        help="activation/comm accounting: fused GPU kernels (megatron) or this project as written "
        "(cp_dtensor); default cp_dtensor with --hw cpu, else megatron",
    )
    p.add_argument("--dtype-bytes", type=int, default=None, help="default 4 with --hw cpu, else 2")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument(
        "--global-batch-tokens",
        type=int,
        default=None,
        help=f"tokens per step (default {DEFAULT_GLOBAL_BATCH_TOKENS} on GPUs; on cpu one micro-batch "
        f"per replica, see --microbatches)",
    )
    p.add_argument(
        "--microbatches", type=int, default=1, help="micro-batches per replica without a global batch"
    )
    p.add_argument(
        "--plans",
        "--layouts",
        dest="plans",
        nargs="*",
        default=None,
        help="only these parallel plans, e.g. tp4+full tp2cp2 cp4 (--layouts: the older name)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="parallel plan the speedups refer to, dp inferred (default: TP min(8, gpus) full recompute, "
        "the seed's TP8 CP1 full recompute)",
    )
    p.add_argument("--top", type=int, default=8, help="rows per detailed table")
    p.add_argument("--max-pp", type=int, default=None)
    p.add_argument("--allow-cross-node-tp", action="store_true")
    p.add_argument("--calibrate-from", default=None, help="JSON with hardware overrides and measurements")
    p.add_argument("--json", default=None, help="also write every estimate to this JSON file")
    st = p.add_argument_group("CP communication strategy (--strategies)")
    st.add_argument(
        "--strategies",
        action="store_true",
        help="print the CP strategy the cost model picks per --seq, --tp and --cp (Note [CP strategy cost])",
    )
    st.add_argument("--cp", type=int, nargs="+", default=[8, 32], help="CP degrees for --strategies")
    st.add_argument("--tp", type=int, nargs="+", default=[1], help="TP degrees for --strategies")
    cal = p.add_argument_group("machine calibration (--calibrate)")
    cal.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine (matmul, attention kernel, gloo p2p and collectives) and write a "
        "calibrated preset to --out; --model picks the shapes (default small)",
    )
    cal.add_argument("--out", default="calib.json", help="where --calibrate writes the preset")
    cal.add_argument("--ranks", type=int, default=4, help="local processes measured at once (a device = one)")
    cal.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a calibration")
    return p


def calibrate(args: argparse.Namespace) -> int:
    """``--calibrate``: measure, write the preset, print what was fitted."""
    from cp_dtensor.tools.planner.measure import ProbeSpec, calibrate_machine, flavor_of

    try:
        if args.quick:
            spec = ProbeSpec.quick(ranks=min(args.ranks, 2))
        else:
            spec = ProbeSpec(ranks=args.ranks, flavor=flavor_of(args.model or "small"))
    except ValueError as e:
        raise SystemExit(f"--calibrate: {e}") from None
    result = calibrate_machine(spec)
    Path(args.out).write_text(json.dumps(result, indent=1))
    hw = Calibration(model="", hardware_overrides=result["hardware"], options_overrides={}, measurements=[])
    hw = hw.build_hardware(result["preset"])
    machine = result["machine"]
    fits = machine["fits"]
    print(f"# python scripts/plan.py {' '.join(args.argv)}")
    print(
        f"# {machine['date_utc']} | {machine['cpu_model']} | {machine['cpu_count']} cores | torch {machine['torch']} | "
        f"{spec.ranks} ranks x 1 thread, flavor {spec.flavor} | load average {machine['load_average_at_start'][0]:.2f}"
        f" -> {machine['load_average_at_end'][0]:.2f} | {machine['calibration_seconds']:.0f} s"
    )
    mm = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in fits["matmul_flops_per_cpu_second"].items())
    att = {k: v * 1e9 for k, v in fits["attention_cpu_s_per_element"].items()}
    call = {k: v * 1e3 for k, v in fits["attention_cpu_s_per_call"].items()}
    layer = fits.get("layer_cpu_s", {})
    rows = [
        ("core share per rank (CPU s / wall s while all ranks compute)", f"{fits['core_share']:.3f}"),
        ("matmul GFLOP per CPU second", mm),
        (
            "attention CPU ns per visible score element, fwd / bwd (unmasked; causal)",
            f"{att['fwd full']:.2f} / {att['bwd full']:.2f}; {att['fwd causal']:.2f} / {att['bwd causal']:.2f}",
        ),
        ("attention CPU ms per kernel call (mean)", f"{statistics.mean(call.values()):.3f}"),
        (
            "block beyond matmuls + kernel: CPU ms per pass, us per token (fwd)",
            f"{layer.get('fixed_per_pass', 0) * 1e3:.3f}, {layer.get('per_token_forward', 0) * 1e6:.2f}",
        ),
        (
            "p2p ring exchange (all ranks at once) GB/s, latency ms",
            f"{hw.intra_node_bandwidth / 1e9:.3f}, {hw.intra_node_latency_s * 1e3:.3f}",
        ),
        (
            "p2p between 2 ranks GB/s, latency ms",
            f"{fits['p2p_pair']['bandwidth'] / 1e9:.3f}, {fits['p2p_pair']['latency_s'] * 1e3:.3f}",
        ),
        (
            "collectives (all-gather, reduce-scatter) GB/s, latency ms per step",
            f"{(hw.collective_bandwidth or 0) / 1e9:.3f}, {(hw.collective_latency_s or 0) * 1e3:.3f}",
        ),
        (
            "preset (wall: CPU rates x core share)",
            f"peak {hw.peak_flops / 1e9:.2f} GFLOP/s, efficiency matmul {hw.matmul_efficiency:.2f} / attention "
            f"{hw.attention_efficiency:.2f} fwd, {hw.attention_backward_efficiency or 0:.2f} bwd, causal x"
            f"{hw.causal_attention_factor:.2f}, kernel call {hw.kernel_call_overhead_s * 1e3:.3f} ms, layer "
            f"{hw.layer_overhead_s * 1e3:.2f} ms, elementwise {(hw.elementwise_bandwidth or 0) / 1e9:.2f} GB/s",
        ),
    ]
    print("| measured | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nwrote {args.out}: use it as --hw {args.out} (plan.py, bench_train.py)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the planner and print markdown."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.calibrate:
        return calibrate(args)
    try:
        hw_base, hw_file = load_hardware(args.hw)
    except ValueError as e:
        raise SystemExit(f"--hw: {e}") from None
    calibration = load_calibration(args.calibrate_from) if args.calibrate_from else None

    model_name = args.model or (calibration.model if calibration and calibration.model else "gpt175b")
    model = build_model_shape(model_name)
    is_cpu = (hw_file.preset or "cpu") == "cpu" if hw_file is not None else args.hw.lower() == "cpu"
    impl = args.impl or ("cp_dtensor" if is_cpu else "megatron")
    hw_overrides = {**(calibration.hardware_overrides if calibration else {})}
    hw_overrides.update(_parse_assignments(args.hw_set, "hw-set"))
    hw = hw_base.with_overrides(hw_overrides)
    base_options = CostOptions.cp_dtensor() if impl == "cp_dtensor" else CostOptions.megatron()
    opt_overrides: dict[str, Any] = {"dtype_bytes": args.dtype_bytes or (4 if is_cpu else 2)}
    opt_overrides.update(hw_file.options_overrides if hw_file else {})
    opt_overrides.update(calibration.options_overrides if calibration else {})
    if args.dtype_bytes:
        opt_overrides["dtype_bytes"] = args.dtype_bytes
    opt_overrides.update(_parse_assignments(args.opt_set, "opt-set"))
    options = base_options.with_overrides(opt_overrides)
    if args.global_batch_tokens is None and not is_cpu:
        args.global_batch_tokens = DEFAULT_GLOBAL_BATCH_TOKENS
    seqs = args.seq or sorted({m.seq_len for m in calibration.measurements} if calibration else {8192})
    if args.strategies:
        print(
            f"# CP strategy per attention layer: {model.name} on {hw.name} ({hw.devices_per_node} devices/node)"
        )
        print()
        print("\n".join(strategy_table(model, seqs, args.tp, args.cp, hw, options.dtype_bytes)))
        return 0
    measured = calibration.measurements if calibration else []
    gpus = args.gpus or sorted({m.plan.world_size for m in measured} or {64})

    print("\n".join(header(model, hw, options, impl, args)))
    dump: list[dict[str, Any]] = []
    for n_gpus in gpus:
        recs: dict[int, Recommendation] = {}
        explicit: list[ParallelPlan] | None = None
        if args.plans:
            explicit = [ParallelPlan.parse(t, n_gpus) for t in args.plans]
        elif measured:
            explicit = list(dict.fromkeys(m.plan for m in measured if m.plan.world_size == n_gpus))
        for seq in seqs:
            try:
                baseline = ParallelPlan.parse(args.baseline or f"tp{min(8, n_gpus)}+full", n_gpus)
            except ValueError:
                baseline = None
            recs[seq] = recommend(
                model,
                seq,
                n_gpus,
                hw,
                options,
                micro_batch=args.micro_batch,
                global_batch_tokens=args.global_batch_tokens,
                microbatches=args.microbatches,
                plans=explicit,
                baseline=baseline,
                allow_cross_node_tp=args.allow_cross_node_tp,
                max_pp=args.max_pp,
            )
        baseline_label = next(
            (r.baseline.plan.label for r in recs.values() if r.baseline is not None), "no baseline"
        )
        if explicit is None:
            print()
            print("\n".join(mix_table(recs, n_gpus, baseline_label)))
        for seq, rec in recs.items():
            print()
            if explicit is not None:
                order = {_key(plan): i for i, plan in enumerate(explicit)}
                rows = sorted([*rec.rows, *rec.rejected], key=lambda e: order.get(_key(e.plan), len(order)))
                print(f"## seq {seq}, {n_gpus} devices: the given layouts")
                print()
                print("\n".join(detail_table(rec, rows, with_reason=True)))
            else:
                print(
                    f"## seq {_fmt_seq(seq)}, {n_gpus} GPUs: top {min(args.top, len(rec.rows))} of "
                    f"{len(rec.rows)} layouts that fit ({len(rec.rejected)} do not)"
                )
                print()
                shown = rec.rows[: args.top]
                if rec.baseline is not None and all(e.plan != rec.baseline.plan for e in shown):
                    shown = [*shown, rec.baseline]
                print("\n".join(detail_table(rec, shown, with_reason=rec.baseline in shown)))
            best = rec.best
            print()
            if best is None:
                print(f"Recommendation (seq {seq}, {n_gpus} GPUs): nothing fits.")
            else:
                print(
                    f"Recommendation (seq {seq}, {n_gpus} GPUs): **{best.plan.label}**, "
                    f"{best.step_time_s:.3g} s/step, {best.tokens_per_s_per_device:.4g} tok/s/GPU, "
                    f"MFU {best.mfu:.1%}, peak {_fmt_bytes(best.peak_bytes)}, "
                    f"{_speedup(rec, best)} vs {baseline_label}"
                    + ("" if rec.baseline is None or rec.baseline.fits else " (baseline does not fit)")
                )
                if best.plan.cp > 1:
                    problem = model_attention_problem(
                        model, seq, best.plan.cp, best.plan.tp, micro_batch=best.micro_batch,
                        dtype_bytes=options.dtype_bytes,
                    )  # fmt: skip
                    print(f"CP strategy (comm=auto): {choose_strategy(problem, hw)[0].reason}")
            for e in [*rec.rows, *rec.rejected]:
                dump.append({"n_gpus": n_gpus, **asdict(e)})

    if calibration is not None:
        print()
        print(f"## Predicted vs measured ({args.calibrate_from}, model {model.name})")
        print()
        print("\n".join(comparison_table(compare_measurements(model, calibration.measurements, hw, options))))
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
