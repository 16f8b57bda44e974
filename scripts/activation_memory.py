#!/usr/bin/env python3
"""Activation memory per rank vs CP degree: bytes saved for backward by one training step.

    python scripts/activation_memory.py                       # small model, S=4096, cp 1/2/4, ac none/full
    python scripts/activation_memory.py --flavor debug --seq-len 1024 --cps 1 2

For each CP degree (at a fixed global sequence length) and activation-checkpointing mode, every rank runs
one forward of the parallelized model under a saved-tensor counter (distinct storages, parameters
excluded), then the backward. The table shows the largest rank's bytes, the ratio to CP = 1 and the ideal
1/CP. Ranks are local CPU processes (gloo), so CP = 4 oversubscribes 2 cores; memory is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from cp_dtensor.launch import run_distributed
from cp_dtensor.memory import count_saved_tensors
from cp_dtensor.models.llama import build_llama
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.parallelize import parallelize_llama
from cp_dtensor.sharding import shard_batch
from cp_dtensor.train_step import token_loss_sum


def measure(args: argparse.Namespace, cp: int, ac: str, out_file: str) -> None:
    """One forward+backward on this rank; rank 0 writes the per-rank saved bytes to ``out_file``."""
    pd = ParallelDims(cp=cp)
    pd.build_mesh("cpu")
    model = build_llama(args.flavor)
    model.init_weights(seed=0)
    parallelize_llama(model, pd, ac_mode=ac)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.args.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    batch = shard_batch({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}, pd.batch_mesh)
    with count_saved_tensors() as counter:
        logits = model(batch["tokens"], batch["positions"])
    token_loss_sum(logits, batch["labels"].to_local()).backward()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, counter.bytes)
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(per_rank))


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="small")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ac", nargs="+", default=["none", "full"], choices=["none", "selective", "full"])
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ac in args.ac:
            base = None
            for cp in args.cps:
                out = os.path.join(tmp, f"{ac}_{cp}.json")
                run_distributed(measure, cp, args, cp, ac, out, threads_per_rank=1)
                per_rank = json.loads(Path(out).read_text())
                peak = max(per_rank)
                base = base if base is not None else peak * cp if cp != 1 else peak
                rows.append({"ac": ac, "cp": cp, "bytes_per_rank": per_rank, "ratio_to_cp1": peak / base})
    print(f"# python scripts/activation_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# flavor={args.flavor} seq_len={args.seq_len} batch={args.batch} torch={torch.__version__}")
    print(
        "| activation checkpointing | CP | saved for backward per rank (MiB, max over ranks) | vs CP=1 | ideal 1/CP |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        mib = max(r["bytes_per_rank"]) / 2**20
        print(f"| {r['ac']} | {r['cp']} | {mib:.2f} | {r['ratio_to_cp1']:.3f} | {1 / r['cp']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
