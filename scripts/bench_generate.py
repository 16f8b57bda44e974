#!/usr/bin/env python3
"""Generation under CP on CPU: prefill throughput and decode latency per CP degree (Note [CP generation]).

    python scripts/bench_generate.py --cps 1 2 4 --prompts 4096 8192 16384 --flavor small --new 16

For each CP degree (local CPU processes, gloo, one intra-op thread per rank) and prompt length: the prefill
time (tokens / s, and the parallel efficiency T_1 / (cp x T_cp) against the one-process prefill of the same
run), the decode time per token (median of the steps after the first), the KV cache bytes per rank (against
the whole cache: 1 / cp of it) and the bytes one decode step sends per rank and layer (B x heads x
(head_dim + 1) x 4). On 2 cores, cp 4 oversubscribes: its wall times measure the algorithm's overhead
under contention, its CPU time (reported) the work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cp_dtensor.generation import GenerationStats, generate
from cp_dtensor.launch import run_distributed
from cp_dtensor.models.llama import build_llama


def measure(args: argparse.Namespace, out_file: str) -> None:
    """Prefill + decode for every prompt length on this rank; rank 0 writes all ranks' figures."""
    group = dist.group.WORLD if dist.is_initialized() else None
    torch.manual_seed(0)
    model = build_llama(args.flavor)
    model.init_weights(seed=0)
    rows = []
    for length in args.prompts:
        ids = torch.randint(
            0, model.args.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)
        )
        stats = GenerationStats()
        if group is not None:
            dist.barrier()
        cpu0 = time.process_time()
        generate(model, ids, group, max_new_tokens=args.new, stats=stats)
        rows.append(
            {
                "prompt": length,
                "prefill_s": stats.prefill_seconds,
                "decode_ms": 1e3 * statistics.median(stats.decode_seconds[1:] or stats.decode_seconds),
                "cache_bytes": stats.cache_bytes,
                "cache_rows": stats.cache_rows,
                "decode_bytes": stats.decode_bytes_per_layer,
                "cpu_s": time.process_time() - cpu0,
                "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    if group is None:
        Path(out_file).write_text(json.dumps([rows]))
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(gathered))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prompts", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--new", type=int, default=16, help="tokens generated per prompt")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cps:
            out = os.path.join(tmp, f"cp{cp}.json")
            if cp == 1:
                torch.set_num_threads(1)
                measure(args, out)
            else:
                run_distributed(measure, cp, args, out, timeout_s=1800, threads_per_rank=1)
            results[cp] = json.loads(Path(out).read_text())
    print(f"# generation, flavor {args.flavor}, {args.new} new tokens, 1 thread per rank (gloo)")
    print(
        "| cp | prompt | prefill s | prefill tok/s | efficiency | decode ms/token | CPU s (all ranks) | "
        "KV cache / rank | of whole | decode bytes / rank / layer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cp, per_rank in results.items():
        for i, length in enumerate(args.prompts):
            prefill = max(r[i]["prefill_s"] for r in per_rank)
            base = results[args.cps[0]][0][i]["prefill_s"] if args.cps[0] == 1 else None
            eff = f"{base / (cp * prefill):.2f}" if base else "-"
            decode = max(r[i]["decode_ms"] for r in per_rank)
            cache = max(r[i]["cache_bytes"] for r in per_rank)
            whole = sum(r[i]["cache_bytes"] for r in per_rank) if cp > 1 else cache
            cpu = sum(r[i]["cpu_s"] for r in per_rank)
            print(
                f"| {cp} | {length} | {prefill:.2f} | {length / prefill:,.0f} | {eff} | {decode:.1f} | {cpu:.1f} | "
                f"{cache / 2**20:.1f} MiB | {cache / whole:.2f} | {per_rank[0][i]['decode_bytes']} |"
            )


if __name__ == "__main__":
    main()
