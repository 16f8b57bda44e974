#!/usr/bin/env python3
"""What the cross-rank call check (Note [Cross-rank call check]) costs per attention call and per step.

    python scripts/bench_call_check.py                    # CP 2, S = 8K and 128K tokens with documents
    python scripts/bench_call_check.py --cp 4 --seq-lens 8192 --calls 200

For each sequence length, on every rank: the check alone (its fixed-size all-reduce plus the signature's
hashing, document-ids digest included), timed over ``--calls`` calls with the same arguments, and one whole
forward + backward of ``ring_attention`` with documents for scale. Per training step the check runs once per
attention layer in forward (and again for every layer recomputed by activation checkpointing); backward
replays the verified call. Ranks are local CPU processes (gloo); rank 0 prints medians over ranks' means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cp_dtensor as cpd
from cp_dtensor.attention.consistency import CallSignature, verify_call_across_ranks
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.launch import run_distributed


def _signature(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> CallSignature:
    """What build_call computes per call (the mask's fingerprint digests the document ids)."""
    return CallSignature.of(
        q, k, k, layout="zigzag", is_causal=True, comm="p2p", scale=None, backend=None,
        mask=mask.fingerprint(), a2a_size=None,
    )  # fmt: skip


def measure(args: argparse.Namespace, out_file: str) -> None:
    """Time the check and one call on this rank; rank 0 writes the per-rank results."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    rows = []
    for seq_len in args.seq_lens:
        s_local = seq_len // cp
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(64, 2048, (seq_len // 64,), generator=g)
        ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[:seq_len][None].contiguous()
        q = torch.randn(1, args.heads, s_local, args.head_dim)
        k = torch.randn(1, args.kv_heads, s_local, args.head_dim)
        mask = AttentionMask(True, (-1, -1), ids)
        verify_call_across_ranks(group, _signature(q, k, mask), None)  # warm (first digest of these ids)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            verify_call_across_ranks(group, _signature(q, k, mask), None)
        check_s = (time.perf_counter() - t0) / args.calls
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, k))
        dist.barrier()
        t0 = time.perf_counter()
        out = cpd.ring_attention(qs, ks, vs, group, is_causal=True, document_ids=ids)
        out.sum().backward()
        call_s = time.perf_counter() - t0
        rows.append({"seq_len": seq_len, "check_s": check_s, "call_s": call_s})
    gathered = [None] * cp
    dist.all_gather_object(gathered, rows, group=group)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--layers", type=int, default=32, help="attention layers per step (Llama 3 8B: 32)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.json")
        run_distributed(measure, args.cp, args, out_file, timeout_s=600)
        per_rank = json.loads(Path(out_file).read_text())
    print(f"# cross-rank call check, CP {args.cp} (gloo, local CPU processes), {args.calls} calls each")
    print(
        f"| seq_len | check per call | per step (x{args.layers} layers) | one fwd+bwd call with documents | share |"
    )
    print("|---|---|---|---|---|")
    for i, seq_len in enumerate(args.seq_lens):
        check = max(r[i]["check_s"] for r in per_rank)
        call = max(r[i]["call_s"] for r in per_rank)
        print(
            f"| {seq_len} | {check * 1e6:.0f} us | {check * args.layers * 1e3:.2f} ms | {call * 1e3:.0f} ms | "
            f"{check / call:.2%} |"
        )


if __name__ == "__main__":
    main()
