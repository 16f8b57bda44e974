"""Spawn the CP ranks, run every measurement for each sequence length, and collect the raw results.

:func:`run_cpu_benchmark` spawns ``cfg.cp`` gloo ranks (one intra-op thread each) through
:func:`cp_dtensor.launch.run_distributed`; each runs :func:`run_rank`, and rank 0 writes the raw
measurements as JSON to a temporary file that the parent reads back.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from cp_dtensor.launch import run_distributed
from cp_dtensor.tools.bench.config import BenchConfig
from cp_dtensor.tools.bench.overlap import measure_overlap
from cp_dtensor.tools.bench.profiling import profile_real_ring
from cp_dtensor.tools.bench.rank_bench import RankBench
from cp_dtensor.tools.bench.time_rounds import time_variants
from cp_dtensor.tools.bench.verify import verify_variants

__all__ = ["run_cpu_benchmark", "run_rank"]


def run_rank(cfg: BenchConfig, result_path: str) -> None:
    """Entry of every spawned rank: run each sequence length; rank 0 writes the raw results as JSON.

    Args:
        cfg: the run's configuration.
        result_path: where rank 0 writes a JSON list with one raw entry per sequence length.
    """
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    raw: list[dict[str, Any]] = []
    for seq_len in cfg.seq_lens:
        bench = RankBench(cfg, seq_len, mesh)
        entry: dict[str, Any] = {"seq_len": seq_len}
        t0 = time.perf_counter()
        entry["verify"] = verify_variants(bench)
        entry["timing"] = time_variants(bench)
        entry["overlap"] = measure_overlap(bench) if cfg.overlap_repeats > 0 else {}
        entry["profile"] = profile_real_ring(bench) if cfg.profile else {}
        entry["bench_seconds"] = time.perf_counter() - t0
        raw.append(entry)
        if bench.rank == 0:
            print(
                f"[bench_attention] S={seq_len} done in {entry['bench_seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        del bench
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(raw))


def run_cpu_benchmark(cfg: BenchConfig, timeout_s: float) -> list[dict[str, Any]]:
    """Run the benchmark on ``cfg.cp`` spawned ranks; return one raw entry per sequence length.

    Args:
        cfg: the run's configuration.
        timeout_s: process-group timeout in seconds.

    Raises:
        cp_dtensor.launch.LaunchError: a rank failed.
    """
    with tempfile.TemporaryDirectory(prefix="bench_attention_") as tmp:
        raw_path = Path(tmp) / "raw.json"
        run_distributed(run_rank, cfg.cp, cfg, str(raw_path), threads_per_rank=1, timeout_s=timeout_s)
        return json.loads(raw_path.read_text())
