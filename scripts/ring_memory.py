#!/usr/bin/env python3
"""Transient memory of the ring per rank as CP grows, at a fixed local shard.

    python scripts/ring_memory.py                         # CP 2, 4, 8; B=1 H=8 S_local=256 D=64, causal zigzag
    python scripts/ring_memory.py --cps 2 4 --s-local 1024 --window 128 --docs

Each rank runs one forward and one backward of ``ring_attention`` and measures, with the live-bytes tracker
(Note [Live-bytes tracker]), the peak of bytes allocated inside the forward and inside the backward
(inputs excluded), in units of the local K+V bytes. Flat in CP means the ring keeps a constant number of
buffers alive, whatever the number of steps. Ranks are local CPU processes (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import cp_dtensor as cpd
from cp_dtensor.launch import run_distributed
from cp_dtensor.memory import track_live_bytes


def measure(args: argparse.Namespace, out_file: str) -> None:
    """Forward and backward on this rank under the tracker; rank 0 writes every rank's peaks."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    b, h, s, d = 1, args.heads, args.s_local, args.head_dim
    q, k, v, dout = (torch.randn(b, h, s, d, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ids = None
    if args.docs:  # documents of 1/3 of a shard: most of them end inside a rank
        ids = (torch.arange(s * cp) // max(1, s // 3)).unsqueeze(0)
    window = (args.window - 1, 0) if args.window else (-1, -1)
    kw = dict(is_causal=True, layout=args.layout, comm=args.comm, document_ids=ids, window_size=window)
    cpd.ring_attention(q, k, v, dist.group.WORLD, **kw).backward(dout)  # warm-up: plans, groups
    with track_live_bytes() as fwd:
        out = cpd.ring_attention(q, k, v, dist.group.WORLD, **kw)
    with track_live_bytes() as bwd:
        out.backward(dout)
    kv_bytes = 2 * k.numel() * k.element_size()
    peaks = [fwd.peak / kv_bytes, bwd.peak / kv_bytes]
    gathered: list = [None] * cp
    dist.all_gather_object(gathered, peaks)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def main(argv: list[str] | None = None) -> None:
    """Run every CP size and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--s-local", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--comm", default="p2p", choices=["p2p", "allgather"])
    p.add_argument("--window", type=int, default=0, help="causal sliding window in tokens (0 = none)")
    p.add_argument("--docs", action="store_true", help="documents of S_local / 3 tokens")
    args = p.parse_args(argv)
    print(f"# python scripts/ring_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"# B=1 H={args.heads} S_local={args.s_local} D={args.head_dim} fp32, causal {args.layout}, {args.comm}, "
        f"window {args.window or 'none'}, documents {'S_local/3' if args.docs else 'none'}"
    )
    print("| CP | forward peak / local KV | backward peak / local KV |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cps:
            out = os.path.join(tmp, f"{cp}.json")
            run_distributed(measure, cp, args, out, threads_per_rank=1, timeout_s=600)
            peaks = json.loads(Path(out).read_text())
            print(f"| {cp} | {max(x[0] for x in peaks):.2f} | {max(x[1] for x in peaks):.2f} |")


if __name__ == "__main__":
    main()
