#!/usr/bin/env python3
"""Benchmark forward+backward context-parallel attention against PyTorch's ring loop and plain SDPA.

One invocation runs, side by side and interleaved (so machine noise hits every variant alike):

  cpd_p2p_zigzag        cp_dtensor.ring_attention(comm="p2p", layout="zigzag")
  cpd_allgather_zigzag  cp_dtensor.ring_attention(comm="allgather", layout="zigzag")
  cpd_p2p_contiguous    cp_dtensor.ring_attention(comm="p2p", layout="contiguous")
  torch_ring_alltoall   PyTorch's _templated_ring_attention(+_backward) loop with the CPU flash op,
                        head-tail load balancing (causal), all-to-all rotater
  torch_ring_allgather  the same with the all-gather rotater
  sdpa_1thread          F.scaled_dot_product_attention on the full sequence, 1 thread (efficiency baseline)
  sdpa_cp_threads       the same with CP threads (as many threads as the CP run has ranks)

CP variants run in CP spawned processes (gloo, one intra-op thread per rank). The single-process SDPA
baselines run on rank 0 of the same job while the other ranks are blocked (idle) in a barrier.

Examples:
    python scripts/bench_attention.py --cp 2 --seq-len 8192 --out results.json
    python scripts/bench_attention.py --cp 4 --seq-len 2048 4096 8192 --plot sweep.png
    python scripts/bench_attention.py --cp 2 --seq-len 256 --repeats 2 --warmup 1 --kv-heads 2

Reported per variant: median and spread of the step time (max over ranks after a barrier), speedup and
parallel efficiency T_single / (CP x T_cp) vs the 1-thread single process, CPU seconds of all ranks,
bytes sent per rank vs the theoretical minimum, saved-for-backward bytes per rank, attention work
max/mean over ranks, the measured fraction of communication hidden behind compute, and the max abs
difference of out/dq/dk/dv against single-process SDPA.

--device cuda (run on one H200 by scripts/check_cuda.sh; CI has no GPU) runs a separate, minimal path: on
one GPU, cp_dtensor.simulate_context_parallel_attention (the ring schedule of every rank in one process)
with each CUDA backend (flash, cudnn, efficient) against one monolithic SDPA call of that backend.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cp_dtensor.layout import validate_seq_len
from cp_dtensor.tools.bench.config import DTYPES, BenchConfig
from cp_dtensor.tools.bench.machine import machine_facts
from cp_dtensor.tools.bench.report import render_tables
from cp_dtensor.tools.bench.results import summarize_seq_len
from cp_dtensor.tools.bench.runner import run_cpu_benchmark
from cp_dtensor.tools.bench.single_gpu import CUDA_BACKENDS, run_cuda
from cp_dtensor.tools.bench.variants import ALL_VARIANT_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", "-b", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=8, help="query heads Hq")
    p.add_argument(
        "--kv-heads", type=int, default=None, help="key/value heads Hkv (default Hq; Hq %% Hkv == 0)"
    )
    p.add_argument("--head-dim", type=int, default=64, help="head dim D")
    p.add_argument(
        "--seq-len", type=int, nargs="+", default=[8192], help="global sequence length(s) S (a sweep)"
    )
    p.add_argument("--cp", type=int, default=2, help="CP degree = number of spawned ranks (one thread each)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    mask = p.add_mutually_exclusive_group()
    mask.add_argument(
        "--causal", dest="causal", action="store_true", default=True, help="causal mask (default)"
    )
    mask.add_argument("--bidirectional", dest="causal", action="store_false", help="no mask")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed warmup rounds before timing")
    p.add_argument(
        "--overlap-repeats",
        type=int,
        default=None,
        help="repeats of the hidden-communication measurement (a/b/c); default --repeats, 0 skips it",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(ALL_VARIANT_NAMES),
        choices=list(ALL_VARIANT_NAMES),
        help="subset of variants (sdpa_1thread, the baseline, is always run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", action="store_true", help="also profile one step per CP variant (time breakdown)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the full results as JSON here")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="write a PNG of efficiency and time against S (default path: --out with .png, or bench_attention.png)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: the distributed benchmark (gloo). cuda: one GPU, "
        "simulated CP ring vs monolithic SDPA for each --backends",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=["flash", "cudnn", "efficient"],
        choices=sorted(CUDA_BACKENDS),
        help="CUDA backends for --device cuda",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="process-group timeout in seconds")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.overlap_repeats is None:
        args.overlap_repeats = args.repeats
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.cp < 2:
        p.error(f"--cp must be >= 2 (got {args.cp}); CP=1 is the single-process SDPA baseline")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    for s in args.seq_len:
        try:
            validate_seq_len(s, args.cp, "zigzag")
        except ValueError as e:
            p.error(str(e))
    if "sdpa_1thread" not in args.variants:
        args.variants.append("sdpa_1thread")
    return args


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The benchmark configuration of parsed command-line options."""
    return BenchConfig(
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        seq_lens=tuple(args.seq_len),
        cp=args.cp,
        dtype=args.dtype,
        causal=args.causal,
        repeats=args.repeats,
        warmup=args.warmup,
        overlap_repeats=args.overlap_repeats,
        variants=tuple(n for n in ALL_VARIANT_NAMES if n in args.variants),
        seed=args.seed,
        profile=args.profile,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report, write JSON (and a plot); return the report."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    command = shlex.join(sys.orig_argv if argv is None else [sys.executable, __file__, *argv])
    facts = machine_facts()
    header = {"command": command, "machine": facts}
    print("# bench_attention: context-parallel attention, forward + backward\n")
    print(f"command: `{command}`")
    print(
        f"machine: {facts['cpu_model']}, {facts['cpu_count']} cores ({facts['usable_cores']} usable), "
        f"torch {facts['torch']}, python {facts['python']}, {facts['platform']}, {facts['date_utc']}, "
        f"load average at start {facts['load_average_at_start']}\n",
        flush=True,
    )
    if args.device == "cuda":
        report = run_cuda(cfg, args.backends, header)
    else:
        print(
            f"config: B={cfg.batch} Hq={cfg.heads} Hkv={cfg.kv_heads} D={cfg.head_dim} S={list(cfg.seq_lens)} "
            f"CP={cfg.cp} {cfg.dtype} {'causal' if cfg.causal else 'bidirectional'}, repeats={cfg.repeats} "
            f"warmup={cfg.warmup} overlap_repeats={cfg.overlap_repeats}; CP variants: {cfg.cp} spawned gloo ranks "
            f"x 1 intra-op thread; step time = max over ranks after a barrier; CPU = sum of process_time over "
            f"ranks; single-process SDPA runs on rank 0 while the other ranks block in a barrier.\n",
            flush=True,
        )
        raw = run_cpu_benchmark(cfg, timeout_s=args.timeout)
        facts["load_average_at_end"] = os.getloadavg()
        results = [summarize_seq_len(cfg, r) for r in raw]
        report = {**header, "device": "cpu", "config": asdict(cfg), "results": results}
        print(f"load average at end: {facts['load_average_at_end']}\n")
        for res in results:
            print(render_tables(cfg, res) + "\n")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    if args.plot is not None and args.device == "cpu":
        from cp_dtensor.tools.bench.plot import plot_results

        path = (
            Path(args.plot)
            if args.plot
            else (args.out.with_suffix(".png") if args.out else Path("bench_attention.png"))
        )
        plot_results(report, path)
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
