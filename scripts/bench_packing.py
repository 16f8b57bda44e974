#!/usr/bin/env python3
"""Kernel calls per ring step and CPU time, per piece against packed varlen calls (Note [Piece packing]).

    python scripts/bench_packing.py                         # 128K tokens, ~400 documents, cp 8, +/- window
    python scripts/bench_packing.py --seq-len 32768 --repeats 5

The workload of the masked-pieces figures: one batch row of S tokens in documents of log-normal length
(``exp(N(0, 1)) * 190 + 1`` tokens, seed 0: 396 documents at 128K), laid out by ``balanced_layout`` over
``--cp`` ranks, causal, without and with a window of (255, 0). Reported, from the plans (no kernel runs):

* per rank and step: pieces (kernel calls of the per-piece path), packed calls (varlen calls: one per mask
  class present), and the dense calls the CPU's varlen loop makes (one per distinct segment shape);
* the CPU time of rank 0's forward + backward (B = 1, Hq = 8, Hkv = 2, D = 64, fp32), through the real ring
  driver with a loopback transport (messages from the other ranks are fabricated with the right shapes,
  so only this rank's compute and merges are timed), per piece and packed: the thread's CPU time on one
  intra-op thread (``--threads 1``), so other jobs on the machine change it little; medians (and minima) of
  ``--repeats`` rounds alternating the modes, after a warm-up; plus the max abs difference between the two
  paths' outputs and gradients;
* with ``--simulate``: the single-process simulation of all ranks (threads) forward + backward, both modes
  (wall time, the modes alternating round by round).

``--device cuda`` runs the same in bf16 with the flash adapter (varlen calls when packed), timed by wall
clock after synchronizing: written for the GPU checks (``scripts/check_cuda.sh``), not run here (no GPU).

Compare the two modes within one run (both share the machine's load and caches).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

import cp_dtensor as cpd
from cp_dtensor.attention.kernels import select_kernel
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.mask_schedule import build_masked_plan
from cp_dtensor.attention.packing import ring_packing
from cp_dtensor.attention.ring import ring_backward, ring_forward
from cp_dtensor.attention.transport import DKV_TAG, Pending, Transport

HQ, HKV, D = 8, 2, 64
WINDOWS = ((-1, -1), (255, 0))
MODES = ("per_piece", "packed")


def make_documents(seq_len: int, seed: int = 0) -> torch.Tensor:
    """(1, S) document ids with log-normal lengths around 190 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, seq_len, dtype=torch.int64)
    pos = doc = 0
    while pos < seq_len:
        n = int(torch.exp(torch.randn((), generator=g) * 1.0) * 190 + 1)
        ids[0, pos : pos + n] = doc
        pos, doc = pos + n, doc + 1
    return ids


class LoopbackTransport(Transport):
    """One rank of a ring whose neighbours are imagined: a receive returns a tensor of the asked shape (random,
    made once per shape and kept in ``pool``, so every run sees the same data and no time goes to making it),
    a send is dropped. Times one rank's compute without the others."""

    def __init__(self, rank: int, size: int, pool: dict) -> None:
        self.rank, self.size, self.bytes_sent = rank, size, 0
        self._pool = pool

    def send_recv(self, send, recv_shape, dtype, device, tag):
        got = None
        if recv_shape is not None:
            key = (tuple(recv_shape), dtype, str(device), tag)
            if key not in self._pool:
                g = torch.Generator().manual_seed(len(self._pool))
                self._pool[key] = torch.randn(recv_shape, generator=g).to(device, dtype)
            got = (
                self._pool[key].clone() if tag == DKV_TAG else self._pool[key]
            )  # dK/dV are added to in place
        return Pending(lambda: got)


def _clock(device: torch.device) -> float:
    """Seconds: this thread's CPU time on CPU (one intra-op thread: all the kernels' work, little disturbed
    by other jobs); wall time after a synchronize on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.thread_time()


def step_counts(plan, batch: int) -> list[tuple[int, int, int]]:
    """Per step: (pieces, packed calls, dense calls of the CPU varlen loop)."""
    packing = ring_packing(plan, batch, torch.device("cpu"))
    rows = []
    for pieces, packed in zip(plan.pieces, packing):
        if packed is None:
            rows.append((len(pieces), len(pieces), len(pieces)))
        else:
            rows.append((len(pieces), len(packed.groups), sum(g.shapes() for g in packed.groups)))
    return rows


def time_rank(
    plan, kernel, repeats: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[dict[str, float], dict[str, list]]:
    """Rank ``plan.rank``'s forward + backward through the ring driver, per piece and packed, the two modes
    alternating round by round: median and min ms per mode (:func:`_clock`), and the results."""
    g = torch.Generator().manual_seed(seed)
    s_local = plan.s_local
    q, dout = (torch.randn(1, HQ, s_local, D, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, HKV, s_local, D, generator=g).to(device, dtype) for _ in range(2))
    scale = D**-0.5
    kernels = {mode: dataclasses.replace(kernel, pack_pieces=mode == "packed") for mode in MODES}
    pool: dict = {}

    def run(mode: str) -> list[torch.Tensor]:
        transport, kern = LoopbackTransport(plan.rank, plan.cp, pool), kernels[mode]
        out, lse = ring_forward(q, k, v, transport, plan=plan, scale=scale, kernel=kern)
        grads = ring_backward(dout, q, k, v, out, lse, transport, plan=plan, scale=scale, kernel=kern)
        return [out, *grads]

    results = {mode: run(mode) for mode in MODES}  # warm-up (and the packing, built once per plan)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            t0 = _clock(device)
            run(mode)
            times[mode].append((_clock(device) - t0) * 1000)
    summary = {f"{m}_median": statistics.median(t) for m, t in times.items()}
    summary.update({f"{m}_min": min(t) for m, t in times.items()})
    return summary, results


def time_simulation(
    ids, layout, window, cp: int, repeats: int, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Median wall seconds of the all-rank simulation (forward + backward) per mode, modes alternating."""
    s = ids.shape[1]
    g = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(1, HQ, s, D, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, HKV, s, D, generator=g).to(device, dtype) for _ in range(2))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(repeats + 1):
        for mode in MODES:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            cpd.simulate_context_parallel_attention(
                q, k, v, cp, grad_out=dout, is_causal=True, layout=layout, document_ids=ids,
                window_size=window, piece_packing=mode,
            )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # round 0 warms up
                times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--cp", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--simulate", action="store_true", help="also time the all-rank simulation")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: CPU time of one thread is all the work)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (fp32, cpu_flash) or cuda (bf16, flash varlen; written for the GPU checks, not run yet)",
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    kernel = select_kernel(device, dtype)
    torch.manual_seed(0)
    ids = make_documents(args.seq_len)
    n_docs = int(ids.max()) + 1
    print(
        f"S = {args.seq_len}, {n_docs} documents, cp {args.cp}, balanced layout, causal; torch {torch.__version__}"
    )
    where = "CPU ms" if device.type == "cpu" else f"ms on {torch.cuda.get_device_name(device)}"
    print(
        f"threads {torch.get_num_threads()}; timing B = 1, Hq = {HQ}, Hkv = {HKV}, D = {D}, {dtype}, {kernel.name}\n"
    )
    report = {"seq_len": args.seq_len, "cp": args.cp, "documents": n_docs, "cases": []}
    for window in WINDOWS:
        layout = cpd.balanced_layout(ids, args.cp, is_causal=True, window_size=window)
        mask = AttentionMask(True, window, ids)
        plans = [build_masked_plan(mask, layout, args.cp, args.seq_len, r) for r in range(args.cp)]
        counts = [step_counts(p, 1) for p in plans]
        name = "no window" if window == (-1, -1) else f"window {window}"
        print(
            f"== {name}: kernel calls per step (pieces / packed calls / CPU loop calls), forward (backward alike)"
        )
        for r, rows in enumerate(counts):
            cells = "  ".join(f"s{s}: {a}/{b}/{c}" for s, (a, b, c) in enumerate(rows) if a)
            totals = [sum(x[i] for x in rows) for i in range(3)]
            print(f"rank {r}: {cells}  | total {totals[0]} / {totals[1]} / {totals[2]}")
        ms, res = time_rank(plans[0], kernel, args.repeats, device, dtype)
        diff = max((a - b).abs().max().item() for a, b in zip(res["per_piece"], res["packed"]))
        ratio = ms["packed_median"] / ms["per_piece_median"]
        print(
            f"rank 0 forward + backward, {where}, median (min) of {args.repeats}: per piece {ms['per_piece_median']:.0f} "
            f"({ms['per_piece_min']:.0f}) ms, packed {ms['packed_median']:.0f} ({ms['packed_min']:.0f}) ms, "
            f"packed / per piece {ratio:.2f}; max |packed - per piece| {diff:.1e}"
        )
        case = {"window": list(window), "counts": counts, "rank0_ms": ms, "max_abs_diff": diff}
        if args.simulate:
            sim = time_simulation(ids, layout, window, args.cp, args.repeats, device, dtype)
            print(
                f"simulation of {args.cp} ranks, forward + backward: per piece {sim['per_piece']:.2f} s, "
                f"packed {sim['packed']:.2f} s"
            )
            case["simulation_s"] = sim
        report["cases"].append(case)
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
