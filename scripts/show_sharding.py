#!/usr/bin/env python3
"""Print how a parallelized Llama model's modules see their tensors (placements, local/global shapes).

    python scripts/show_sharding.py --cp 2 --tp 2                # spawns 4 local CPU processes
    torchrun --nproc-per-node 4 scripts/show_sharding.py --cp 2 --tp 2

Rank 0 prints one line per module input, output and parameter: mesh axes with placements
(S(d) = Shard(d), R = Replicate), then local shape / global shape. The global view of a CP-sharded
DTensor is the sequence in layout order (zigzag-permuted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.launch import run_distributed
from cp_dtensor.models.llama import build_llama
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.parallelize import parallelize_llama
from cp_dtensor.sharding import shard_batch
from cp_dtensor.sharding_table import format_sharding_table, inspect_sharding


def show(args: argparse.Namespace) -> None:
    """Build, parallelize and inspect the model on this rank; rank 0 prints the table."""
    pd = ParallelDims(dp=args.dp, cp=args.cp, tp=args.tp, cp_layout=args.layout)
    pd.build_mesh()
    pd.validate_seq_len(args.seq_len)
    model = build_llama(args.flavor)
    model.init_weights(seed=0)
    settings = CPSettings(layout=args.layout, comm=args.comm)
    cp_attention = parallelize_llama(model, pd, cp_settings=settings, ac_mode="none")
    tokens = torch.randint(
        0, model.args.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    batch = shard_batch({"tokens": tokens}, pd.batch_mesh, layout=args.layout)
    records = inspect_sharding(model, batch["tokens"], batch["positions"])
    if dist.get_rank() == 0:
        keep = [
            r
            for r in records
            if args.all or not any(x in r.name for x in (".wq", ".wk", ".wv", ".w1", ".w3", "rope"))
        ]
        print(
            f"# flavor={args.flavor} seq_len={args.seq_len} batch={args.batch} dp={pd.dp} cp={pd.cp} tp={pd.tp} "
            f"layout={args.layout} comm={args.comm} (rank 0 of {pd.world_size})"
        )
        if cp_attention is not None:
            print(
                f"# CP attention: every SDPA inside layers.*.attention runs the ring op (layout "
                f"{settings.layout}, comm {settings.comm}); q, k, v reach it as local shards. Between "
                f"blocks the hidden state is a DTensor in layout order (cp_dtensor.unshard_sequence_output for "
                f"natural order)."
            )
        print(format_sharding_table(keep))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run :func:`show` on every rank."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--comm", default="p2p", choices=["p2p", "allgather"])
    p.add_argument("--all", action="store_true", help="also list q/k/v/w1/w3 projections and rope")
    args = p.parse_args(argv)
    run_distributed(show, args.dp * args.cp * args.tp, args, threads_per_rank=1)


if __name__ == "__main__":
    main()
