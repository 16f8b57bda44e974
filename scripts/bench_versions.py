#!/usr/bin/env python3
"""This tree's ring attention against an earlier revision's, interleaved round by round on 2 CPU ranks.

    python scripts/bench_versions.py --old-rev b679e33 --seq-len 8192 --rounds 15

The old revision's ``cp_dtensor`` is exported from git into a temporary folder as the package
``cp_dtensor_old`` (imports rewritten), so both versions run in the same processes: every round times one
forward + backward of each (order alternating, a barrier around each), causal zigzag p2p, B 1, 8 heads,
head dim 64, fp32, one intra-op thread per rank. Reported: both medians, the per-round paired difference
(new - old: median and IQR, also as a share of the old median) and whether the outputs and dq are
bit-identical. Pairing cancels the machine's drift, which moves single timings by 5-15% on this VM.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cp_dtensor.launch import run_distributed  # noqa: E402


def export_old(rev: str, into: Path) -> None:
    """``git archive`` of ``rev``'s cp_dtensor into ``into/cp_dtensor_old`` with its imports renamed."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "cp_dtensor"], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
        tar.extractall(into, filter="data")
    (into / "cp_dtensor").rename(into / "cp_dtensor_old")
    for path in (into / "cp_dtensor_old").rglob("*.py"):
        path.write_text(re.sub(r"\bcp_dtensor\b", "cp_dtensor_old", path.read_text()))


def job(old_root: str, seq: int, rounds: int, out: str) -> None:
    """Interleaved rounds on this rank; rank 0 writes the times."""
    sys.path.insert(0, old_root)
    import cp_dtensor_old as old

    import cp_dtensor as new
    from cp_dtensor.layout import shard_sequence_for_rank

    rank, cp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 8, seq, 64, generator=g) for _ in range(4))
    local = [shard_sequence_for_rank(t, rank, cp, 2, "zigzag") for t in (q, k, v, dout)]
    fns = {"old": old.ring_attention, "new": new.ring_attention}
    times: dict[str, list[float]] = {name: [] for name in fns}
    results = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            qq, kk, vv = (t.clone().requires_grad_() for t in local[:3])
            dist.barrier()
            t0 = time.perf_counter()
            o = fns[name](qq, kk, vv, dist.group.WORLD, is_causal=True, layout="zigzag")
            o.backward(local[3])
            dist.barrier()
            if r:
                times[name].append(time.perf_counter() - t0)
            results[name] = (o.detach(), qq.grad, kk.grad, vv.grad)
    same = all(torch.equal(a, b) for a, b in zip(results["old"], results["new"]))
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "bitwise_equal": same}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old-rev", default="b679e33", help="the earlier revision (git)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        export_old(args.old_rev, Path(tmp))
        out = os.path.join(tmp, "times.json")
        run_distributed(job, 2, tmp, args.seq_len, args.rounds, out, threads_per_rank=1, timeout_s=1800)
        data = json.loads(Path(out).read_text())
    t = data["times"]
    diffs = [n - o for n, o in zip(t["new"], t["old"])]
    q1, _, q3 = statistics.quantiles(diffs, n=4)
    base = statistics.median(t["old"])
    print(
        f"S={args.seq_len}, {args.rounds} rounds: old ({args.old_rev}) median {base * 1e3:.1f} ms, new median "
        f"{statistics.median(t['new']) * 1e3:.1f} ms; paired new - old median {statistics.median(diffs) * 1e3:+.1f} ms "
        f"[IQR {q1 * 1e3:+.1f}, {q3 * 1e3:+.1f}] = {statistics.median(diffs) / base:+.2%} of old; out, dq, dk, dv "
        f"bit-identical: {data['bitwise_equal']}"
    )


if __name__ == "__main__":
    main()
