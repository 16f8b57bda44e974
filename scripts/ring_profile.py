#!/usr/bin/env python3
"""Where the time of one CP ring call goes on CPU: the kernel, the log-sum-exp merge, copies, waits, the rest.

    python scripts/ring_profile.py                       # CP 2 and 4, S = 8192, Hq = Hkv = 8, D = 64, fp32
    python scripts/ring_profile.py --cp 2 --seq-len 2048 --repeats 1

Each rank runs forward + backward of ``ring_attention`` (causal, zigzag, p2p) under ``torch.profiler``
with labels put around the ring's parts from outside (the library is not changed: this script wraps the
functions the ring calls), and classifies every profiled op by its nearest label:

* kernel: the attention kernel op itself (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
  backward), self time
* adapter: the rest of the kernel adapter calls (input slicing, GQA expansion, ``contiguous``)
* merge: the fp32 log-sum-exp merge of a block into the accumulators (``merge_block_``)
* accumulate: dQ / dK / dV accumulation in backward (``+=`` into the fp32 accumulators, new accumulators)
* pack / convert: K,V packed into one message, dtype conversions and other copies of the ring
* wait: blocked in ``Pending.wait`` (communication not hidden)
* rest: wall time of the call minus all of the above (Python, autograd, schedule, posting transfers)

Shares are of the rank's wall time per call (median over ``--repeats`` profiled calls after a warm-up),
averaged over ranks (they add up to 100%); "wall ms" is the slowest rank's. CP 4 on 2 cores oversubscribes: its ranks wait for cores, which shows as
"wait" and "rest"; compare its kernel / merge / copy shares, not its wall time. The single-process row is
one fused SDPA call on the whole sequence with one thread (the work a CP rank's kernel calls split).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import cp_dtensor as cpd
from cp_dtensor.attention import kernels, ring
from cp_dtensor.launch import run_distributed
from cp_dtensor.layout import shard_sequence_for_rank

PARTS = ("kernel", "adapter", "merge", "accumulate", "pack / convert", "wait", "rest")
KERNEL_OPS = ("flash_attention_for_cpu",)
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::cat", "aten::stack", "aten::clone", "aten::zero_"}
ACCUMULATE_OPS = {"aten::add_"}


def _labelled(fn, label: str):
    """``fn`` wrapped in a profiler label."""

    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _ring_labels():
    """Label the ring's parts by wrapping the functions it calls (restored on exit)."""
    patches = [
        (ring, "merge_block_", "cp::merge"),
        (ring, "pack_kv", "cp::pack"),
        (ring, "timed_wait", "cp::wait"),
        (ring, "_own_accumulators", "cp::accumulate"),
        (ring, "_travelling_accumulator", "cp::accumulate"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    methods = [(cls, name) for cls in vars(kernels).values() if isinstance(cls, type) and issubclass(cls, kernels.AttentionKernel) for name in ("forward", "backward") if name in vars(cls)]  # fmt: skip
    saved_methods = [(cls, name, vars(cls)[name]) for cls, name in methods]
    try:
        for mod, name, label in patches:
            setattr(mod, name, _labelled(getattr(mod, name), label))
        for cls, name, fn in saved_methods:
            setattr(cls, name, _labelled(fn, "cp::adapter"))
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        for cls, name, fn in saved_methods:
            setattr(cls, name, fn)


def _classify(events) -> dict[str, float]:
    """Seconds per part from the profiled events (self times, by nearest label)."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("cp::") or e.name.startswith("ProfilerStep"):
            continue
        label, parent = None, e.cpu_parent
        while parent is not None:
            if parent.name.startswith("cp::"):
                label = parent.name
                break
            parent = parent.cpu_parent
        seconds = e.self_cpu_time_total / 1e6
        if any(k in e.name for k in KERNEL_OPS):
            out["kernel"] += seconds
        elif label == "cp::adapter":
            out["adapter"] += seconds
        elif label == "cp::merge":
            out["merge"] += seconds
        elif label == "cp::accumulate" or (label is None and e.name in ACCUMULATE_OPS):
            out["accumulate"] += seconds
        elif label == "cp::wait":
            out["wait"] += seconds
        elif label == "cp::pack" or (label is None and e.name in COPY_OPS):
            out["pack / convert"] += seconds
    # a wait is mostly time blocked outside any op: count the label's whole span
    out["wait"] = sum(e.cpu_time_total / 1e6 for e in events if e.name == "cp::wait")
    return out


def measure(args: argparse.Namespace, out_file: str) -> None:
    """Profile ``--repeats`` ring calls on this rank; rank 0 writes every rank's shares."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    s, h, d = args.seq_len, args.heads, args.head_dim
    q, k, v, dout = (torch.randn(1, h, s, d, generator=g) for _ in range(4))
    local = [shard_sequence_for_rank(t, rank, cp, 2, "zigzag") for t in (q, k, v, dout)]

    def call() -> None:
        ql, kl, vl = (t.detach().requires_grad_() for t in local[:3])
        out = cpd.ring_attention(ql, kl, vl, dist.group.WORLD, is_causal=True, layout="zigzag", comm="p2p")
        out.backward(local[3])

    call()  # warm-up: schedule, allocator
    rows: list[dict[str, float]] = []
    with _ring_labels():
        for _ in range(args.repeats):
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                call()
                wall = time.perf_counter() - t0
            parts = _classify(prof.events())
            parts["rest"] = max(0.0, wall - sum(parts.values()))
            rows.append({"wall": wall, **parts})
    median = {key: statistics.median(r.get(key, 0.0) for r in rows) for key in ("wall", *PARTS)}
    gathered: list[dict] = [None] * cp  # type: ignore[list-item]
    dist.all_gather_object(gathered, median)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def _single_process(args: argparse.Namespace) -> float:
    """Seconds of one fused SDPA forward + backward on the whole sequence, one thread (median)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (
            torch.randn(1, args.heads, args.seq_len, args.head_dim, generator=g) for _ in range(4)
        )
        times = []
        for _ in range(args.repeats + 1):
            ql, kl, vl = (t.requires_grad_() for t in (q.clone(), k.clone(), v.clone()))
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(ql, kl, vl, is_causal=True).backward(dout)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    """Profile each CP degree and print one markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"# python scripts/ring_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"# {os.cpu_count()} cores, torch {torch.__version__}; B=1 H={args.heads} S={args.seq_len} "
        f"D={args.head_dim} fp32, causal zigzag p2p, forward + backward of one call, median of {args.repeats}"
    )
    print("| cp | wall ms | " + " | ".join(f"{part} %" for part in PARTS) + " |")
    print("|---|---|" + "---|" * len(PARTS))
    single = _single_process(args)
    print(f"| 1 (one fused SDPA call, 1 thread) | {single * 1e3:.0f} | 100 |" + " - |" * (len(PARTS) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cp:
            out = os.path.join(tmp, f"{cp}.json")
            run_distributed(measure, cp, args, out, threads_per_rank=1, timeout_s=1800)
            per_rank = json.loads(Path(out).read_text())
            wall = max(r["wall"] for r in per_rank)
            shares = [statistics.mean(r[part] / r["wall"] for r in per_rank) * 100 for part in PARTS]
            print(f"| {cp} | {wall * 1e3:.0f} | " + " | ".join(f"{x:.1f}" for x in shares) + " |")


if __name__ == "__main__":
    main()
