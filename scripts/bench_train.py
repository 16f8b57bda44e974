#!/usr/bin/env python3
"""Training step time, tokens/s and activation memory across parallel plans of one world size.

    python scripts/bench_train.py                                   # small Llama, S=4096, world 4 on CPU
    python scripts/bench_train.py --plans tp4+full tp2cp2 cp4 --seq-len 4096 --json train.json --plot train.png
    python scripts/plan.py --hw cpu --calibrate-from train.json      # the cost model's predicted vs measured
    python scripts/plan.py --calibrate --out calib.json && python scripts/bench_train.py --hw calib.json

Reproduces the shape of the seed's Figure 2 at CPU scale: TP-only with full recompute (the seed's "TP8CP1
full recompute" baseline, here tp4 + full) against TP x CP mixes without recompute (tp2 x cp2, cp4). Each
plan runs as local CPU processes (gloo, one intra-op thread per rank); every step is the real training
step (forward, backward, FSDP2 over dp x cp, clipping, AdamW). Reported per plan: median and min/max step
time (max over ranks), global tokens/s, total CPU seconds of all ranks per step (meaningful when ranks
outnumber cores), the bytes saved for backward on the largest rank (activations: distinct storages,
parameters excluded) and the peak RSS. The JSON output is the planner's calibration format
(Note [Calibration file] in cp_dtensor/tools/planner/calibration.py), so plan.py can state the cost model's
error. After the table the script prints the planner's prediction for every plan with ``--hw`` (the
``cpu`` preset, or a preset calibrated on this machine by ``scripts/plan.py --calibrate``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from cp_dtensor.launch import run_distributed
from cp_dtensor.memory import count_saved_tensors
from cp_dtensor.models.llama import build_llama
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.parallelize import build_parallel_model
from cp_dtensor.sharding import shard_batch
from cp_dtensor.tools.planner import (
    CostOptions,
    ParallelPlan,
    build_model_shape,
    compare_measurements,
    load_calibration,
    load_hardware,
)
from cp_dtensor.train_step import train_step


def run_plan(args: argparse.Namespace, plan: ParallelPlan, out_file: str) -> None:
    """Train ``args.steps`` steps of ``plan`` on this rank; rank 0 writes the measurements."""
    pd = ParallelDims(dp=plan.dp, cp=plan.cp, tp=plan.tp, pp=plan.pp)
    pd.build_mesh("cpu")
    pd.validate_seq_len(args.seq_len)
    model = build_llama(args.flavor)
    model.init_weights(seed=0)
    pm = build_parallel_model(
        model, pd, device=torch.device("cpu"), ac_mode=plan.ac, selective_ac_every=plan.selective_every
    )
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in pm.model_parts]
    g = torch.Generator().manual_seed(0)
    rows = args.batch * pd.dp
    tokens = torch.randint(0, model.args.vocab_size, (rows, args.seq_len + 1), generator=g)
    batch = shard_batch({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}, pd.batch_mesh)
    step_kwargs = dict(loss_mesh=pd.loss_mesh, pipeline=pm.pipeline, max_norm=1.0)
    times, cpu = [], []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if step == args.warmup:  # measure activations on one timed step
            with count_saved_tensors() as counter:
                train_step(pm.model_parts, opts, batch, **step_kwargs)
        else:
            train_step(pm.model_parts, opts, batch, **step_kwargs)
        wall = torch.tensor([time.perf_counter() - t0])
        spent = torch.tensor([time.process_time() - c0])
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        dist.all_reduce(spent)  # summed over ranks
        if step >= args.warmup:
            times.append(wall.item())
            cpu.append(spent.item())
    act = [None] * dist.get_world_size()
    dist.all_gather_object(act, counter.bytes)
    rss = [None] * dist.get_world_size()
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps({"times": times, "cpu": cpu, "activation": act, "rss": rss}))


def main(argv: list[str] | None = None) -> int:
    """Run every plan, print the table, write JSON/PNG."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="small")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="sequences per data-parallel rank")
    p.add_argument(
        "--plans",
        "--layouts",
        dest="plans",
        nargs="+",
        default=["tp4+full", "tp2cp2", "cp4"],
        help="parallel plans to run, e.g. tp4+full tp2cp2 cp4 (--layouts: the older name)",
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="", help="write the results (planner calibration format)")
    p.add_argument("--plot", default="", help="write a PNG bar chart of step time and activation memory")
    p.add_argument(
        "--hw",
        default="cpu",
        help="the planner's hardware for the predictions: a preset name or a file of plan.py --calibrate",
    )
    args = p.parse_args(argv)
    try:
        load_hardware(args.hw)  # fail before the runs, not after them
    except ValueError as e:
        p.error(f"--hw: {e}")
    plans = [ParallelPlan.parse(text, world_size=None) for text in args.plans]
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for text, plan in zip(args.plans, plans):
            out = os.path.join(tmp, "out.json")
            run_distributed(run_plan, plan.world_size, args, plan, out, threads_per_rank=1)
            r = json.loads(Path(out).read_text())
            results.append((text, plan, r))
    tokens = args.batch * args.seq_len * plans[0].dp
    print(f"# python scripts/bench_train.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC | {platform.machine()} {os.cpu_count()} cores | "
        f"torch {torch.__version__} | flavor {args.flavor} | seq_len {args.seq_len} | batch/dp-rank {args.batch} | "
        f"{args.steps} timed steps after {args.warmup} warm-up | 1 thread per rank | load average (1 min) "
        f"{load_start:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(
        "| layout | world | step s (median) | min / max | tokens/s | CPU s/step (all ranks) | "
        "activations MiB/rank (max) | peak RSS MiB/rank (max) | speedup vs first |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = statistics.median(results[0][2]["times"])
    for text, plan, r in results:
        med = statistics.median(r["times"])
        print(
            f"| {text} | {plan.world_size} | {med:.3f} | {min(r['times']):.3f} / {max(r['times']):.3f} | "
            f"{tokens / med:,.0f} | {statistics.median(r['cpu']):.2f} | {max(r['activation']) / 2**20:.1f} | "
            f"{max(r['rss']) / 2**20:.0f} | {base / med:.2f}x |"
        )
    calibration = {
        "model": args.flavor,
        "seq_len": args.seq_len,
        "micro_batch": args.batch,
        "measurements": [
            {
                "layout": plan.to_dict(),  # the calibration file's key (Note [Calibration file])
                "step_time_s": statistics.median(r["times"]),
                "activation_bytes": max(r["activation"]),
                "cpu_seconds_per_step": statistics.median(r["cpu"]),
            }
            for _, plan, r in results
        ],
    }
    _print_prediction_error(args, calibration)
    if args.json:
        for row in calibration["measurements"]:
            row.pop("cpu_seconds_per_step")
        Path(args.json).write_text(json.dumps(calibration, indent=2))
    if args.plot:
        _plot(args.plot, results, args)
    return 0


def _print_prediction_error(args: argparse.Namespace, calibration: dict) -> None:
    """The cost model's predictions (hardware ``args.hw``) for these plans against the measurements."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        rows = [
            {k: v for k, v in row.items() if k != "cpu_seconds_per_step"}
            for row in calibration["measurements"]
        ]
        json.dump({**calibration, "measurements": rows}, f)
    cal = load_calibration(f.name)
    os.unlink(f.name)
    hw, hw_file = load_hardware(args.hw)
    options = CostOptions.cp_dtensor(dtype_bytes=4)
    if hw_file is not None:
        options = options.with_overrides(hw_file.options_overrides)
    comparisons = compare_measurements(build_model_shape(args.flavor), cal.measurements, hw, options)
    print(f"\nPredicted with hardware {hw.name!r} (--hw {args.hw}):\n")
    measured = (hw_file.machine.get("spec") or {}).get("flavor") if hw_file is not None else None
    if measured is not None and measured != args.flavor:
        print(f"(the preset was calibrated on the shapes of flavor {measured!r}, not {args.flavor!r})\n")
    print(
        "| layout | predicted step s | measured | error | compute s (matmul / attention / overhead) | "
        "exposed comm s (TP / CP / FSDP) | predicted activations MiB | measured | error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in comparisons:
        m, e = c.measurement, c.estimate
        print(
            f"| {m.plan.label} | {e.step_time_s:.3f} | {m.step_time_s:.3f} | {c.step_time_error:+.0%} | "
            f"{e.matmul_s:.2f} / {e.attention_s:.2f} / {e.overhead_s:.2f} | "
            f"{e.tp_exposed_s:.2f} / {e.cp_exposed_s:.2f} / {e.fsdp_exposed_s:.2f} | "
            f"{e.activation_bytes / 2**20:.1f} | {m.activation_bytes / 2**20:.1f} | {c.activation_error:+.0%} |"
        )


def _plot(path: str, results: list, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [text for text, _, _ in results]
    times = [statistics.median(r["times"]) for _, _, r in results]
    acts = [max(r["activation"]) / 2**20 for _, _, r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [times[0] / t for t in times], color="tab:blue")
    a.set_ylabel(f"speedup vs {names[0]}")
    a.set_title("step time")
    b.bar(names, acts, color="tab:orange")
    b.set_ylabel("MiB per rank")
    b.set_title("activations saved for backward")
    fig.suptitle(f"{args.flavor}, S={args.seq_len}, world {results[0][1].world_size} (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
