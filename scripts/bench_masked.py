#!/usr/bin/env python3
"""Document-masked and sliding-window CP attention on CPU: time, work, bytes, memory against the alternatives.

    python scripts/bench_masked.py                          # CP 2 and 4, S = 8192, long-tailed documents
    python scripts/bench_masked.py --cps 2 --seq-len 4096 --docs many_short --window 512

Every variant runs forward + backward of one attention call (B=1, Hq=8, Hkv=2, D=64, fp32) on the same
inputs and reports the median wall time of ``--repeats`` rounds (after a warm-up), per rank:

* ``masked/balanced``  cp_dtensor's masked ring, batch laid out by ``balanced_layout``
* ``masked/zigzag``    cp_dtensor's masked ring on the zigzag layout
* ``one-document``     (a) the same ring ignoring the documents (plain causal zigzag: the work and bytes
                        the mask saves; not the same result)
* ``allgather-dense``  (b) PyTorch's approach for such masks: all-gather K/V, then SDPA of the local queries
                        against the whole sequence with a dense boolean mask
* ``one-process``      (c) the masked op on one process, and ``dense`` single-process SDPA with a dense mask

Columns: time (ms), work = score elements computed / visible pairs, max/mean work over ranks, bytes sent
per rank (forward + backward), peak transient memory per rank (live-bytes tracker, Note [Live-bytes
tracker]) and the max abs error against fp64 dense-mask SDPA. Ranks are local CPU processes (gloo); at
CP = 4 they oversubscribe 2 cores, so compare variants within a CP size, not across.
"""

from __future__ import annotations

import argparse
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
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.launch import run_distributed
from cp_dtensor.layout import sequence_positions, shard_sequence_for_rank
from cp_dtensor.memory import track_live_bytes

HQ, HKV, D = 8, 2, 64


def make_documents(kind: str, seq_len: int, seed: int) -> torch.Tensor:
    """(1, S) ids: "long_tailed" (log-normal lengths around S/40, a few much longer) or "many_short"."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, seq_len, dtype=torch.int64)
    pos, doc = 0, 0
    while pos < seq_len:
        if kind == "long_tailed":
            length = int(torch.exp(torch.randn((), generator=g) * 1.3).item() * seq_len / 40) + 1
        else:
            length = int(torch.randint(16, 129, (), generator=g))
        ids[0, pos : pos + length] = doc
        pos, doc = pos + length, doc + 1
    return ids


def _inputs(seq_len: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(1, HQ, seq_len, D), (1, HKV, seq_len, D), (1, HKV, seq_len, D), (1, HQ, seq_len, D)]
    return [torch.randn(s, generator=g) for s in shapes]


def _time(step, repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(args: argparse.Namespace, out_file: str) -> None:
    """Run every variant on this rank; rank 0 writes the per-rank results."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    s = args.seq_len
    ids = make_documents(args.docs, s, seed=1)
    window = (args.window - 1, 0) if args.window > 0 else (-1, -1)
    mask = AttentionMask(True, window, ids)
    q, k, v, dout = _inputs(s)
    ref = _dense(q.double(), k.double(), v.double(), dout.double(), mask)
    layouts = {"masked/balanced": cpd.balanced_layout(ids, cp, window_size=window), "masked/zigzag": "zigzag"}
    rows = {}
    for name, layout in [*layouts.items(), ("one-document", "zigzag"), ("allgather-dense", "contiguous")]:
        local = [shard_sequence_for_rank(t, rank, cp, 2, layout) for t in (q, k, v, dout)]
        stats = cpd.AttentionStats()
        result: dict[str, torch.Tensor] = {}

        def step(name=name, layout=layout, local=local, stats=stats, result=result) -> None:
            ql, kl, vl = (t.detach().requires_grad_() for t in local[:3])
            if name == "allgather-dense":
                out = _allgather_dense(ql, kl, vl, mask, rank, cp, s, stats)
            else:
                masked = name.startswith("masked")
                out = cpd.ring_attention(
                    ql, kl, vl, dist.group.WORLD, is_causal=True, layout=layout,
                    document_ids=ids if masked else None, window_size=window if masked else (-1, -1),
                    stats=stats,
                )  # fmt: skip
            out.backward(local[3])
            result.update(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad)

        ms = _time(step, args.repeats)
        calls = args.repeats + 1
        with track_live_bytes() as live:
            step()
        calls += 1
        positions = sequence_positions(s, rank, cp, layout)
        positions = positions if positions.dim() == 2 else positions.unsqueeze(0)
        visible = int(mask.visible_counts(s).gather(1, positions).sum()) * HQ
        err = max(
            (result[n].double() - shard_sequence_for_rank(r, rank, cp, 2, layout)).abs().max().item()
            for n, r in zip(("out", "dq", "dk", "dv"), ref)
        )
        rows[name] = {
            "ms": ms,
            "score_elements": stats.score_elements_forward / calls,
            "visible": visible,
            "bytes": (stats.bytes_sent_forward + stats.bytes_sent_backward) / calls,
            "peak_bytes": live.peak,
            "err": err,
        }
    gathered: list[dict] = [None] * cp  # type: ignore[list-item]
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def _dense(q, k, v, dout, mask: AttentionMask) -> list[torch.Tensor]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.dense(q.shape[2]).unsqueeze(1), enable_gqa=True
    )
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


class _AllGatherKV(torch.autograd.Function):
    """All-gather K/V along the sequence (contiguous layout); backward reduce-scatters the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stats: cpd.AttentionStats) -> torch.Tensor:
        cp = dist.get_world_size()
        out = x.new_empty((cp * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        stats.bytes_sent_forward += (cp - 1) * x.numel() * x.element_size()
        ctx.stats = stats
        return torch.cat(out.view(cp, *x.shape).unbind(0), dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = dist.get_world_size()
        parts = torch.cat(grad.chunk(cp, dim=2), dim=0).contiguous()  # (cp * B, H, S_local, D)
        out = grad.new_empty((grad.shape[0], *parts.shape[1:]))
        dist.reduce_scatter_tensor(out, parts)
        ctx.stats.bytes_sent_backward += (cp - 1) * out.numel() * out.element_size()
        return out, None


def _allgather_dense(q, k, v, mask, rank, cp, s, stats) -> torch.Tensor:
    """PyTorch's approach: the whole sequence's K/V and a dense (S_local x S) mask on every rank."""
    k_full, v_full = _AllGatherKV.apply(k, stats), _AllGatherKV.apply(v, stats)
    s_local = s // cp
    dense = mask.dense(s)[:, rank * s_local : (rank + 1) * s_local].unsqueeze(1)  # (1, 1, S_local, S)
    stats.score_elements_forward += HQ * s_local * s
    return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=dense, enable_gqa=True)


def single_process(args: argparse.Namespace) -> dict[str, dict]:
    """(c): the masked op on one process, and SDPA with a dense mask."""
    s = args.seq_len
    ids = make_documents(args.docs, s, seed=1)
    window = (args.window - 1, 0) if args.window > 0 else (-1, -1)
    mask = AttentionMask(True, window, ids)
    q, k, v, dout = _inputs(s)
    visible = int(mask.visible_counts(s).sum()) * HQ
    rows = {}
    for name in ("one-process", "dense"):
        stats = cpd.AttentionStats()

        def step(name=name, stats=stats) -> None:
            ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
            if name == "dense":
                out = F.scaled_dot_product_attention(
                    ql, kl, vl, attn_mask=mask.dense(s).unsqueeze(1), enable_gqa=True
                )
            else:
                out = cpd.ring_attention(
                    ql, kl, vl, None, is_causal=True, document_ids=ids, window_size=window, stats=stats
                )
            out.backward(dout)

        ms = _time(step, args.repeats)
        with track_live_bytes() as live:
            step()
        calls = args.repeats + 2
        elements = stats.score_elements_forward / calls if name == "one-process" else HQ * s * s
        rows[name] = {
            "ms": ms,
            "score_elements": elements,
            "visible": visible,
            "bytes": 0,
            "peak_bytes": live.peak,
            "err": 0.0,
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one markdown table per CP size."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cps", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--docs", choices=["long_tailed", "many_short"], default="long_tailed")
    p.add_argument("--window", type=int, default=0, help="causal sliding window in tokens (0 = none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    ids = make_documents(args.docs, args.seq_len, seed=1)
    print(f"# python scripts/bench_masked.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"# S={args.seq_len}, {int(ids.max()) + 1} documents ({args.docs}), window {args.window or 'none'}, "
        f"B=1 Hq={HQ} Hkv={HKV} D={D} fp32, forward+backward, torch {torch.__version__}"
    )
    single = single_process(args)
    results: dict[str, object] = {"single": single}
    header = (
        "| variant | ms | work / visible | work max/mean | MiB sent per rank | peak MiB per rank | max err |"
    )
    print(f"\n## one process\n\n{header}\n|---|---|---|---|---|---|---|")
    for name, r in single.items():
        print(
            f"| {name} | {r['ms']:.1f} | {r['score_elements'] / r['visible']:.2f} | 1.00 | 0 | {r['peak_bytes'] / 2**20:.1f} | - |"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cps:
            out = os.path.join(tmp, f"cp{cp}.json")
            run_distributed(measure, cp, args, out, threads_per_rank=1, timeout_s=600)
            per_rank = json.loads(Path(out).read_text())
            results[f"cp{cp}"] = per_rank
            print(f"\n## CP = {cp}\n\n{header}\n|---|---|---|---|---|---|---|")
            for name in per_rank[0]:
                rs = [r[name] for r in per_rank]
                work = [r["visible"] for r in rs]
                print(
                    f"| {name} | {max(r['ms'] for r in rs):.1f} "
                    f"| {sum(r['score_elements'] for r in rs) / sum(work):.2f} "
                    f"| {max(work) / (sum(work) / len(work)):.2f} | {max(r['bytes'] for r in rs) / 2**20:.2f} "
                    f"| {max(r['peak_bytes'] for r in rs) / 2**20:.1f} | {max(r['err'] for r in rs):.1e} |"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
