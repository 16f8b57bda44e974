#!/usr/bin/env python3
"""CP communication strategies on CPU: ring (p2p), all-gather, all-to-all (Ulysses) and hybrid, one call.

    python scripts/bench_strategies.py                                 # CP 4, S = 8192, Hkv 8 and 2
    python scripts/bench_strategies.py --cp 2 --seq-len 2048 --repeats 1 --kv-heads 2

Every strategy runs forward + backward of one ``ring_attention`` call (B=1, Hq=8, D=64, fp32, causal, zigzag)
on the same inputs and reports, per rank:

* time: median wall time of ``--repeats`` rounds after a warm-up (max over ranks of the per-rank median);
  the rounds interleave the strategies, so a change of machine load hits all of them
* CPU s: process CPU seconds of one call summed over ranks (medians): the measure when CP processes
  oversubscribe the cores
* comm wait: the part of it spent blocked in communication (``AttentionStats.comm_wait_seconds``: the ring's
  waits and the all-to-alls; the all-gather variant's collectives are not timed there, so it shows 0)
* bytes sent per rank, forward and backward (max over ranks)
* saved for backward: bytes autograd keeps between forward and backward (q, k, v, out, lse of the shard)
* peak transient memory of forward + backward (live-bytes tracker, Note [Live-bytes tracker]; the smaller
  of two calls)
* max abs error against fp64 single-process SDPA

``hybrid`` is all-to-all inside groups of ``--a2a-size`` ranks and the ring across them. Ranks are local CPU
processes (gloo) that oversubscribe the cores at CP 4 on 2 cores: compare strategies within one table, not
with a GPU, where the all-to-alls and the ring's overlap behave differently.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cp_dtensor as cpd
from cp_dtensor.launch import run_distributed
from cp_dtensor.layout import shard_sequence_for_rank
from cp_dtensor.memory import track_live_bytes

HQ, D = 8, 64


def _strategies(args: argparse.Namespace) -> list[tuple[str, str, int | None]]:
    return [
        ("p2p", "p2p", None),
        ("allgather", "allgather", None),
        ("alltoall", "alltoall", None),
        (f"hybrid {args.a2a_size} x {args.cp // args.a2a_size}", "hybrid", args.a2a_size),
        ("auto", "auto", None),
    ]


def _predicted(args: argparse.Namespace, hkv: int) -> tuple[dict[str, float], str]:
    """The cost model's fwd+bwd ms per strategy name on ``--hw`` (Note [CP strategy cost]), and its choice."""
    from cp_dtensor.attention.choice import hardware_for_device
    from cp_dtensor.tools.planner import AttentionProblem, choose_strategy

    problem = AttentionProblem(HQ, hkv, D, args.seq_len, args.cp, dtype_bytes=4)
    best, rows = choose_strategy(problem, hardware_for_device("cpu", args.hw))
    by_label = {r.label: r.time_s * 1e3 for r in rows if r.valid}
    names = {"p2p": "p2p", "allgather": "allgather", "alltoall": "alltoall"}
    names[f"hybrid({args.a2a_size})"] = f"hybrid {args.a2a_size} x {args.cp // args.a2a_size}"
    predicted = {names[label]: ms for label, ms in by_label.items() if label in names}
    predicted["auto"] = best.time_s * 1e3
    return predicted, best.label


def measure(args: argparse.Namespace, hkv: int, out_file: str) -> None:
    """Run every strategy on this rank; rank 0 writes every rank's results."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    s = args.seq_len
    q, dout = (torch.randn(1, HQ, s, D, generator=g) for _ in range(2))
    k, v = (torch.randn(1, hkv, s, D, generator=g) for _ in range(2))
    ref = None
    if args.check:
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        out.backward(dout.double())
        ref = [out.detach(), qd.grad, kd.grad, vd.grad]
    local = [shard_sequence_for_rank(t, rank, cp, 2, "zigzag") for t in (q, k, v, dout)]
    strategies = _strategies(args)
    stats = {name: cpd.AttentionStats() for name, _, _ in strategies}
    saved: dict[str, int] = {}
    result: dict[str, torch.Tensor] = {}

    def step(name: str, comm: str, a2a: int | None) -> None:
        ql, kl, vl = (t.detach().requires_grad_() for t in local[:3])
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = cpd.ring_attention(
                ql, kl, vl, dist.group.WORLD, is_causal=True, comm=comm, a2a_size=a2a, stats=stats[name]
            )
        saved[name] = sum(sizes)
        out.backward(local[3])
        result.update(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad)

    for strategy in strategies:  # warm-up: plans, subgroups, allocator
        step(*strategy)
    for st in stats.values():
        st.bytes_sent_forward = st.bytes_sent_backward = 0
        st.comm_wait_seconds = 0.0
    wall: dict[str, list[float]] = {name: [] for name, _, _ in strategies}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in strategies}
    for _ in range(args.repeats):  # rounds interleave the strategies: a change of load hits them all
        for strategy in strategies:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step(*strategy)
            wall[strategy[0]].append(time.perf_counter() - t0)
            cpu[strategy[0]].append(time.process_time() - c0)
    rows = {}
    n = max(args.repeats, 1)
    for name, comm, a2a in strategies:
        rows[name] = {
            "ms": statistics.median(wall[name]) * 1000 if wall[name] else 0.0,
            "cpu_s": statistics.median(cpu[name]) if cpu[name] else 0.0,
            "wait_ms": stats[name].comm_wait_seconds / n * 1000,
            "fwd": stats[name].bytes_sent_forward / n,
            "bwd": stats[name].bytes_sent_backward / n,
            "saved": saved[name],
        }
        peaks = []
        for _ in range(2):  # the smaller of two: a late free (garbage of an earlier call) only adds
            result.clear()
            gc.collect()
            with track_live_bytes() as live:
                step(name, comm, a2a)
            peaks.append(live.peak)
        rows[name]["peak"] = min(peaks)
        rows[name]["err"] = None
        if ref is not None:
            rows[name]["err"] = max(
                (result[x].double() - shard_sequence_for_rank(r, rank, cp, 2, "zigzag")).abs().max().item()
                for x, r in zip(("out", "dq", "dk", "dv"), ref)
            )
    gathered: list[dict] = [None] * cp  # type: ignore[list-item]
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main(argv: list[str] | None = None) -> None:
    """Run the strategies for each KV head count and print one markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    p.add_argument("--a2a-size", type=int, default=2, help="all-to-all group size of the hybrid strategy")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the fp64 reference")
    p.add_argument(
        "--hw",
        default="cpu",
        help="preset or calibration JSON the cost model's predictions use (comm=auto too)",
    )
    args = p.parse_args(argv)
    print(f"# python scripts/bench_strategies.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"# CP {args.cp} (gloo, local CPU processes, {os.cpu_count()} cores), B=1 Hq={HQ} S={args.seq_len} "
        f"D={D} fp32, causal zigzag, forward + backward of one call, median of {args.repeats}; predicted: "
        f"the cost model on {args.hw}"
    )
    print(
        "| Hkv | strategy | time (ms) | predicted (ms) | CPU s all ranks | comm wait (ms) | sent fwd / bwd per "
        "rank (MiB) | saved for bwd (MiB) | peak transient (MiB) | max abs err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for hkv in args.kv_heads:
            out = os.path.join(tmp, f"{hkv}.json")
            run_distributed(measure, args.cp, args, hkv, out, threads_per_rank=1, timeout_s=1800)
            per_rank = json.loads(Path(out).read_text())
            predicted, choice = _predicted(args, hkv)
            for name in per_rank[0]:
                rows = [r[name] for r in per_rank]
                err = "-" if rows[0]["err"] is None else f"{max(r['err'] for r in rows):.1e}"
                pred = f"{predicted[name]:.0f}" if name in predicted else "-"
                label = f"auto -> {choice}" if name == "auto" else name
                print(
                    f"| {hkv} | {label} | {max(r['ms'] for r in rows):.0f} | {pred} | "
                    f"{sum(r['cpu_s'] for r in rows):.2f} "
                    f"| {max(r['wait_ms'] for r in rows):.0f} "
                    f"| {_mib(max(r['fwd'] for r in rows))} / {_mib(max(r['bwd'] for r in rows))} "
                    f"| {_mib(max(r['saved'] for r in rows))} | {_mib(max(r['peak'] for r in rows))} | {err} |"
                )


if __name__ == "__main__":
    main()
