#!/usr/bin/env python3
"""Benchmark forward+backward context-parallel attention against PyTorch's ring loop and plain SDPA.

One invocation runs, side by side and interleaved (so machine noise hits every variant alike):

  cpd_p2p_zigzag        cp_dtensor.ring_attention(comm="p2p", layout="zigzag")
  cpd_allgather_zigzag  cp_dtensor.ring_attention(comm="allgather", layout="zigzag")
  cpd_p2p_contiguous    cp_dtensor.ring_attention(comm="p2p", layout="contiguous")
  torch_ring_alltoall   PyTorch's _templated_ring_attention(+_backward) loop with the CPU flash op,
                        head-tail load balancing (causal), all-to-all rotater
  torch_ring_allgather  the same with the all-gather rotater
  sdpa_1thread          F.scaled_dot_product_attention on the full sequence, 1 thread (efficiency baseline)
  sdpa_cp_threads       the same with CP threads (as many threads as the CP run has ranks)

CP variants run in CP spawned processes (gloo, one intra-op thread per rank). The single-process SDPA
baselines run on rank 0 of the same job while the other ranks are blocked (idle) in a barrier.

Examples:
    python scripts/bench_attention.py --cp 2 --seq-len 8192 --out results.json
    python scripts/bench_attention.py --cp 4 --seq-len 2048 4096 8192 --plot sweep.png
    python scripts/bench_attention.py --cp 2 --seq-len 256 --repeats 2 --warmup 1 --kv-heads 2

Reported per variant: median and spread of the step time (max over ranks after a barrier), speedup and
parallel efficiency T_single / (CP x T_cp) vs the 1-thread single process, CPU seconds of all ranks,
bytes sent per rank vs the theoretical minimum, saved-for-backward bytes per rank, attention work
max/mean over ranks, the measured fraction of communication hidden behind compute, and the max abs
difference of out/dq/dk/dv against single-process SDPA.

--device cuda (run on one H200 by scripts/check_cuda.sh; CI has no GPU) runs a separate, minimal path: on
one GPU, cp_dtensor.simulate_context_parallel_attention (the ring schedule of every rank in one process)
with each CUDA backend (flash, cudnn, efficient) against one monolithic SDPA call of that backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(_SCRIPTS.parent))
sys.path.insert(0, str(_SCRIPTS))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _bench_common import (  # noqa: E402
    CollectiveMeter,
    LocalCollectivesMode,
    LocalCopyTransport,
    TimedTransport,
    dtype_from_name,
    format_bytes,
    hidden_fraction,
    machine_facts,
    markdown_table,
    min_bytes_per_rank,
    saved_bytes_during,
    score_elements,
    summarize,
    time_call,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import cp_dtensor  # noqa: E402
from cp_dtensor.attention.comm import DKV_TAG, KV_TAG, ProcessGroupTransport, RingStats, Transport  # noqa: E402
from cp_dtensor.attention.kernels import select_kernel  # noqa: E402
from cp_dtensor.attention.ring import (  # noqa: E402
    allgather_backward,
    allgather_forward,
    ring_backward,
    ring_forward,
)
from cp_dtensor.launch import run_distributed  # noqa: E402
from cp_dtensor.layout import layout_permutation, shard_sequence_for_rank, validate_seq_len  # noqa: E402

_aten = torch.ops.aten
CPU_FLASH_FWD = _aten._scaled_dot_product_flash_attention_for_cpu
CPU_FLASH_BWD = _aten._scaled_dot_product_flash_attention_for_cpu_backward

CP_KINDS = ("cpd", "torch")
EFFICIENCY_BAR = 0.97
CPU_RATIO_BAR = 1.05
BYTES_BAR = 0.01
WORK_BAR = 1.02
SAVED_BAR = 1.05


# ----------------------------------------------------------------------------------------------------
# Configuration and variants
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration (all sequence lengths share it)."""

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_lens: tuple[int, ...]
    cp: int
    dtype: str
    causal: bool
    repeats: int
    warmup: int
    overlap_repeats: int
    variants: tuple[str, ...]
    seed: int
    profile: bool

    @property
    def scale(self) -> float:
        """Softmax scale 1 / sqrt(D)."""
        return 1.0 / math.sqrt(self.head_dim)


@dataclass(frozen=True)
class Variant:
    """One benchmarked implementation.

    Attributes:
        name: key in tables and JSON.
        label: human description.
        kind: ``"cpd"`` (cp_dtensor), ``"torch"`` (PyTorch's ring loop) or ``"sdpa"`` (single process).
        layout: sequence layout of the CP inputs (zigzag == head-tail round robin).
        comm: ``p2p``/``allgather`` for cp_dtensor, ``alltoall``/``allgather`` for PyTorch's rotaters.
        threads: intra-op threads of a single-process variant.
    """

    name: str
    label: str
    kind: str
    layout: str = "zigzag"
    comm: str = ""
    threads: int = 1


def build_variants(cp: int, causal: bool) -> list[Variant]:
    """Every variant of one run, in table order."""
    torch_layout = "zigzag" if causal else "contiguous"  # PyTorch balances only causal attention
    balance = "head-tail" if causal else "no balancing"
    return [
        Variant("cpd_p2p_zigzag", "cp_dtensor p2p ring, zigzag", "cpd", "zigzag", "p2p"),
        Variant("cpd_allgather_zigzag", "cp_dtensor all-gather, zigzag", "cpd", "zigzag", "allgather"),
        Variant("cpd_p2p_contiguous", "cp_dtensor p2p ring, contiguous", "cpd", "contiguous", "p2p"),
        Variant(
            "torch_ring_alltoall",
            f"PyTorch ring loop, {balance}, all-to-all",
            "torch",
            torch_layout,
            "alltoall",
        ),
        Variant(
            "torch_ring_allgather",
            f"PyTorch ring loop, {balance}, all-gather",
            "torch",
            torch_layout,
            "allgather",
        ),
        Variant("sdpa_1thread", "single-process SDPA, 1 thread", "sdpa", threads=1),
        Variant("sdpa_cp_threads", f"single-process SDPA, {cp} threads", "sdpa", threads=cp),
    ]


ALL_VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in build_variants(2, True))


# ----------------------------------------------------------------------------------------------------
# PyTorch's ring loop, driven with the CPU flash op
# ----------------------------------------------------------------------------------------------------


def _torch_cp() -> Any:
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention


@contextlib.contextmanager
def torch_cp_options(rotate_method: str, load_balance: bool) -> Iterator[None]:
    """Set PyTorch's module-global CP options for the block (benchmark process only), then restore them."""
    tcp = _torch_cp()
    old = (tcp._cp_options.rotate_method, tcp._cp_options.enable_load_balance)
    tcp.set_rotate_method(rotate_method)
    tcp._cp_options.enable_load_balance = load_balance
    try:
        yield
    finally:
        tcp._cp_options.rotate_method, tcp._cp_options.enable_load_balance = old


class CountingOp:
    """Wrap an attention op; count the visible score elements of every call from its shapes."""

    def __init__(self, op: Callable[..., Any]) -> None:
        self.op = op
        self.elements = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        q = kwargs["query"] if "query" in kwargs else args[0]
        k = kwargs["key"] if "key" in kwargs else args[1]
        self.elements += score_elements(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2], bool(kwargs["is_causal"])
        )
        self.calls += 1
        return self.op(*args, **kwargs)


@dataclass
class TorchRingSpec:
    """How to call PyTorch's ring loop: group, mask, rotater, balancing and the ops."""

    group: dist.ProcessGroup
    causal: bool
    scale: float
    rotate_method: str
    load_balance: bool
    fwd_op: Callable[..., Any] = CPU_FLASH_FWD
    bwd_op: Callable[..., Any] = CPU_FLASH_BWD


def torch_ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: TorchRingSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's ``_templated_ring_attention`` on local shards (B, H, S_local, D); returns (out, lse)."""
    with torch_cp_options(spec.rotate_method, spec.load_balance):
        out, lse = _torch_cp()._templated_ring_attention(
            spec.group, 2, spec.fwd_op, q, k, v, is_causal=spec.causal, scale=spec.scale
        )
    return out, lse


def torch_ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: TorchRingSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's ``_templated_ring_attention_backward``; returns (dq, dk, dv)."""
    with torch_cp_options(spec.rotate_method, spec.load_balance):
        dq, dk, dv = _torch_cp()._templated_ring_attention_backward(
            spec.group,
            2,
            spec.bwd_op,
            dout,
            "grad_out",
            q,
            k,
            v,
            out,
            lse,
            spec.causal,
            dropout_p=0.0,
            scale=spec.scale,
        )
    return dq, dk, dv


class TorchRingAttention(torch.autograd.Function):
    """Autograd wrapper of PyTorch's ring loop; saves q, k, v, out and lse like cp_dtensor's op."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: TorchRingSpec
    ) -> torch.Tensor:
        out, lse = torch_ring_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch_ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None


def torch_rotater_comm_only(spec: TorchRingSpec, kv: torch.Tensor, dkv: torch.Tensor) -> None:
    """The messages of PyTorch's ring loop (forward + backward) in its order, without any compute."""
    tcp = _torch_cp()
    method = (
        tcp._RotateMethod.ALL_TO_ALL if spec.rotate_method == "alltoall" else tcp._RotateMethod.ALL_GATHER
    )
    size = dist.get_world_size(spec.group)
    rot = tcp._create_rotater(spec.group, 2, method)
    for i in range(size):  # forward
        if i > 0:
            rot.next_buffer()
        if i < size - 1:
            rot.exchange_buffers(kv)
    kv_rot = tcp._create_rotater(spec.group, 2, method)
    dkv_rot = tcp._create_rotater(spec.group, 2, tcp._RotateMethod.ALL_TO_ALL)
    for i in range(size):  # backward: KV again, dK/dV (fp32) with an all-to-all at every step
        if i > 0:
            kv_rot.next_buffer()
        if i != size - 1:
            kv_rot.exchange_buffers(kv)
        if i > 0:
            dkv_rot.next_buffer()
        dkv_rot.exchange_buffers(dkv)
    dkv_rot.next_buffer()


def torch_bytes_analytic(cp: int, kv_shard: int, dkv_shard: int) -> dict[str, int]:
    """Bytes per rank of PyTorch's loop from its code: KV (CP-1) times each pass, dK/dV CP times (fp32)."""
    return {"forward": (cp - 1) * kv_shard, "backward": (cp - 1) * kv_shard + cp * dkv_shard}


# ----------------------------------------------------------------------------------------------------
# cp_dtensor ring without autograd (for the overlap measurement)
# ----------------------------------------------------------------------------------------------------


def cpd_direct_step(
    variant: Variant,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    transport: Transport,
    causal: bool,
    scale: float,
) -> None:
    """cp_dtensor's ring forward + backward called directly with ``transport`` (no autograd)."""
    fwd, bwd = (
        (ring_forward, ring_backward) if variant.comm == "p2p" else (allgather_forward, allgather_backward)
    )
    kernel = select_kernel(q.device, q.dtype, "cpu_flash")
    opts: dict[str, Any] = dict(is_causal=causal, scale=scale, layout=variant.layout, kernel=kernel)
    out, lse = fwd(q, k, v, transport, **opts)
    bwd(dout, q, k, v, out, lse, transport, **opts)


def cpd_comm_only(
    variant: Variant, transport: Transport, kv: torch.Tensor, dkv: torch.Tensor, dkv_per_rank: torch.Tensor
) -> None:
    """The messages of cp_dtensor's ring (forward + backward) in its order, without any compute.

    Args:
        variant: which cp_dtensor variant's messages to replay.
        transport: the real transport.
        kv: (2, B, Hkv, S_local, D) packed KV, as both passes send it.
        dkv: fp32 dK/dV accumulator like ``kv`` (p2p).
        dkv_per_rank: (CP, 2, B, Hkv, S_local, D) fp32 input of the all-gather variant's reduce-scatter.
    """
    cp = transport.size
    if variant.comm == "allgather":
        transport.all_gather(kv)  # forward
        transport.all_gather(kv)  # backward re-gathers KV
        transport.reduce_scatter(dkv_per_rank)
        return
    for _ in range(cp - 1):  # forward
        transport.exchange(kv, KV_TAG).wait()
    sends = []
    for step in range(cp):  # backward: same order as ring_backward
        acc_in = transport.recv(dkv, DKV_TAG) if step >= 2 else None
        pending_kv = transport.exchange(kv, KV_TAG) if step < cp - 1 else None
        if acc_in is not None:
            acc_in.wait()
        if step >= 1:
            sends.append(transport.send(dkv, DKV_TAG))
        if pending_kv is not None:
            pending_kv.wait()
    if cp > 1:
        transport.recv(dkv, DKV_TAG).wait()
    for pending in sends:
        pending.wait()


# ----------------------------------------------------------------------------------------------------
# The per-rank benchmark (runs inside the spawned processes)
# ----------------------------------------------------------------------------------------------------


class RankBench:
    """Inputs, step functions and measurements of one rank for one sequence length."""

    def __init__(self, cfg: BenchConfig, seq_len: int, mesh: DeviceMesh) -> None:
        self.cfg = cfg
        self.seq_len = seq_len
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.cp = dist.get_world_size(self.group)
        self.dtype = dtype_from_name(cfg.dtype)
        gen = torch.Generator().manual_seed(cfg.seed + seq_len)
        b, h, hkv, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim

        def randn(heads: int) -> torch.Tensor:
            return torch.randn(b, heads, seq_len, d, generator=gen).to(self.dtype)

        self.full = {"q": randn(h), "k": randn(hkv), "v": randn(hkv), "dout": randn(h)}  # (B, H, S, D)
        self.local: dict[str, dict[str, torch.Tensor]] = {
            layout: {
                n: shard_sequence_for_rank(t, self.rank, self.cp, 2, layout) for n, t in self.full.items()
            }
            for layout in ("zigzag", "contiguous")
        }  # (B, H, S_local, D)
        self.variants = [v for v in build_variants(self.cp, cfg.causal) if v.name in cfg.variants]

    # -- helpers ---------------------------------------------------------------------------------------

    def _leaves(self, variant: Variant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        src = self.full if variant.kind == "sdpa" else self.local[variant.layout]
        q, k, v = (src[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v"))
        return q, k, v, src["dout"]

    def _torch_spec(
        self, variant: Variant, fwd_op: Any = CPU_FLASH_FWD, bwd_op: Any = CPU_FLASH_BWD
    ) -> TorchRingSpec:
        return TorchRingSpec(
            self.group, self.cfg.causal, self.cfg.scale, variant.comm, self.cfg.causal, fwd_op, bwd_op
        )

    def _forward(
        self, variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        cfg = self.cfg
        if variant.kind == "cpd":
            return cp_dtensor.ring_attention(
                q,
                k,
                v,
                self.mesh,
                is_causal=cfg.causal,
                scale=cfg.scale,
                layout=variant.layout,
                comm=variant.comm,
                backend="cpu_flash",
                stats=kw.get("stats"),
            )
        if variant.kind == "torch":
            return TorchRingAttention.apply(q, k, v, kw.get("spec") or self._torch_spec(variant))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=cfg.causal, scale=cfg.scale, enable_gqa=cfg.heads != cfg.kv_heads
            )

    def make_step(self, variant: Variant) -> Callable[[], None]:
        """A closure running one forward + backward of ``variant`` on fresh-gradient leaves."""
        q, k, v, dout = self._leaves(variant)
        spec = self._torch_spec(variant) if variant.kind == "torch" else None

        def step() -> None:
            q.grad = k.grad = v.grad = None
            out = self._forward(variant, q, k, v, spec=spec)
            out.backward(dout)

        return step

    def _runs_here(self, variant: Variant) -> bool:
        return variant.kind != "sdpa" or self.rank == 0

    @contextlib.contextmanager
    def _threads(self, variant: Variant) -> Iterator[None]:
        if variant.kind == "sdpa" and self.rank == 0:
            torch.set_num_threads(variant.threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    # -- 1. correctness, bytes, work, saved bytes (one untimed step each) --------------------------------

    def verify(self) -> dict[str, Any]:
        """Run each variant once; gather outputs to rank 0 and compare; count bytes, work, saved bytes."""
        results: dict[str, Any] = {}
        ref: dict[str, torch.Tensor] | None = None
        ours: dict[str, torch.Tensor] | None = None
        sdpa_ref = next(v for v in self.variants if v.name == "sdpa_1thread")
        if self.rank == 0:
            q, k, v, dout = self._leaves(sdpa_ref)
            saved: dict[str, int] = {}
            with saved_bytes_during(saved):
                out = self._forward(sdpa_ref, q, k, v)
            out.backward(dout)
            ref = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
            results["sdpa_1thread"] = {"saved_bytes": saved["bytes"], "saved_tensors": saved["tensors"]}
        dist.barrier(self.group)
        for variant in self.variants:
            if variant.kind == "sdpa":
                if variant.name != "sdpa_1thread" and self.rank == 0:
                    with self._threads(variant):
                        q, k, v, dout = self._leaves(variant)
                        out = self._forward(variant, q, k, v)
                        out.backward(dout)
                    got = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
                    results[variant.name] = {"max_abs_diff_vs_sdpa": _diffs(got, ref)}
                dist.barrier(self.group)
                continue
            rec = self._verify_cp(variant)
            q, k, v = rec.pop("_grads")
            got = {
                n: cp_dtensor.unshard_sequence(t.detach(), self.mesh, 2, variant.layout)
                for n, t in (("out", rec.pop("_out")), ("dq", q), ("dk", k), ("dv", v))
            }
            if self.rank == 0:
                rec["max_abs_diff_vs_sdpa"] = _diffs(got, ref)
                if ours is None and variant.name == "cpd_p2p_zigzag":
                    ours = got
                if ours is not None:
                    rec["max_abs_diff_vs_cpd_p2p_zigzag"] = _diffs(got, ours)
            results[variant.name] = rec
        per_rank = [None] * self.cp
        dist.all_gather_object(per_rank, results, group=self.group)
        merged: dict[str, Any] = {}
        for name in per_rank[0]:
            merged[name] = {**per_rank[0][name], "per_rank": [r.get(name, {}) for r in per_rank]}
            for r in merged[name]["per_rank"]:
                for key in ("max_abs_diff_vs_sdpa", "max_abs_diff_vs_cpd_p2p_zigzag"):
                    r.pop(key, None)
        merged["head_tail_equals_zigzag"] = bool(
            torch.equal(
                _torch_head_tail_indices(self.seq_len, self.cp),
                layout_permutation(self.seq_len, self.cp, "zigzag").to(torch.int64),
            )
        )
        return merged

    def _verify_cp(self, variant: Variant) -> dict[str, Any]:
        q, k, v, dout = self._leaves(variant)
        saved: dict[str, int] = {}
        rec: dict[str, Any] = {}
        if variant.kind == "cpd":
            stats = RingStats()
            with saved_bytes_during(saved):
                out = self._forward(variant, q, k, v, stats=stats)
            out.backward(dout)
            rec.update(
                bytes_forward=stats.bytes_sent_forward,
                bytes_backward=stats.bytes_sent_backward,
                work_forward=stats.score_elements_forward,
                work_backward=stats.score_elements_backward,
                kernel_calls_forward=stats.kernel_calls_forward,
                kernel_calls_backward=stats.kernel_calls_backward,
                bytes_source="RingStats",
            )
        else:
            fwd_op, bwd_op = CountingOp(CPU_FLASH_FWD), CountingOp(CPU_FLASH_BWD)
            spec = self._torch_spec(variant, fwd_op, bwd_op)
            meter = CollectiveMeter(self.rank)
            with saved_bytes_during(saved), meter:
                out = self._forward(variant, q, k, v, spec=spec)
            meter.phase = "backward"
            with meter:
                out.backward(dout)
            rec.update(
                bytes_forward=meter.bytes_by_phase.get("forward", 0),
                bytes_backward=meter.bytes_by_phase.get("backward", 0),
                collective_calls=meter.calls_by_phase,
                work_forward=fwd_op.elements,
                work_backward=bwd_op.elements,
                kernel_calls_forward=fwd_op.calls,
                kernel_calls_backward=bwd_op.calls,
                bytes_source="counted: functional collectives intercepted by a TorchDispatchMode",
            )
        rec.update(
            saved_bytes=saved["bytes"],
            saved_tensors=saved["tensors"],
            _out=out,
            _grads=(q.grad, k.grad, v.grad),
        )
        return rec

    # -- 2. timing ---------------------------------------------------------------------------------------

    def time_all(self) -> dict[str, Any]:
        """Warmup, then ``repeats`` interleaved rounds of every variant.

        Returns per variant and repeat: wall (max over ranks), cpu (sum over ranks) and ``preempted`` (the
        involuntary context switches of all ranks during the step: how often the OS took a core away),
        and under ``"load_1min"`` the machine's 1-minute load average at each timed round.
        """
        steps = {v.name: self.make_step(v) for v in self.variants if self._runs_here(v)}
        local: dict[str, list[tuple[float, float, int]]] = {v.name: [] for v in self.variants}
        loads: list[float] = []
        n = len(self.variants)
        for rnd in range(self.cfg.warmup + self.cfg.repeats):
            order = self.variants[rnd % n :] + self.variants[: rnd % n]  # rotate: no fixed position bias
            for variant in order:
                with self._threads(variant):
                    dist.barrier(self.group)
                    if not self._runs_here(variant):
                        continue
                    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
                    wall, cpu = time_call(steps[variant.name])
                    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches
                if rnd >= self.cfg.warmup:
                    local[variant.name].append((wall, cpu, switches))
            if rnd >= self.cfg.warmup:
                loads.append(os.getloadavg()[0])
        per_rank = [None] * self.cp
        dist.all_gather_object(per_rank, local, group=self.group)
        out: dict[str, Any] = {}
        for variant in self.variants:
            rows = [r[variant.name] for r in per_rank if r[variant.name]]  # ranks that ran it
            out[variant.name] = [
                {
                    "wall": max(r[i][0] for r in rows),
                    "cpu": sum(r[i][1] for r in rows),
                    "preempted": sum(r[i][2] for r in rows),
                }
                for i in range(len(rows[0]))
            ]
        out["load_1min"] = loads
        return out

    # -- 3. overlap: real ring (a) vs local copies (b) vs communication alone (c) ------------------------

    def measure_overlap(self) -> dict[str, Any]:
        """Interleaved rounds of (a), (b), (c) for every CP variant; see Note [Hidden communication].

        cp_dtensor variants also get (d): the compute of *every* rank's ring run one after the other on
        rank 0 with local-copy transports (one thread; no communication, no oversubscription), whose CPU
        seconds compared with the single process give the ring's own compute overhead.

        Returns, per variant, the series of a, b, c and wait (each the max over ranks per repeat), the CPU
        seconds of all ranks for a, b, c, rank 0's d, and each rank's own waits split by kind.
        """
        cp_variants = [v for v in self.variants if v.kind in CP_KINDS]
        fns = {v.name: self._overlap_fns(v) for v in cp_variants}
        local: dict[str, dict[str, list[float]]] = {v.name: {} for v in cp_variants}
        single = next(v for v in self.variants if v.name == "sdpa_1thread")
        single_step = self.make_step(single) if self.rank == 0 else None
        single_cpu: list[float] = []
        for rnd in range(self.cfg.warmup + self.cfg.overlap_repeats):
            dist.barrier(self.group)
            if single_step is not None:  # the single process again, in this phase's machine conditions
                _, cpu = time_call(single_step)
                if rnd >= self.cfg.warmup:
                    single_cpu.append(cpu)
            for variant in cp_variants:
                for what, fn in fns[variant.name].items():
                    dist.barrier(self.group)
                    if what == "d" and self.rank != 0:
                        continue
                    t0, c0 = time.perf_counter(), time.process_time()
                    extra = fn()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    if rnd >= self.cfg.warmup:
                        rec = local[variant.name]
                        for key, value in ((what, wall), (f"cpu_{what}", cpu), *extra.items()):
                            rec.setdefault(key, []).append(value)
        per_rank = [None] * self.cp
        dist.all_gather_object(per_rank, local, group=self.group)
        out: dict[str, Any] = {}
        n = self.cfg.overlap_repeats
        for variant in cp_variants:
            recs = [r[variant.name] for r in per_rank]
            series: dict[str, Any] = {}
            for what in ("a", "b", "c", "wait"):
                series[what] = [max(r[what][i] for r in recs) for i in range(n)]
            for what in ("a", "b", "c"):  # CPU seconds of all ranks
                series[f"cpu_{what}"] = [sum(r[f"cpu_{what}"][i] for r in recs) for i in range(n)]
            if "d" in recs[0]:
                series["d_serial_s"], series["cpu_d"] = recs[0]["d"], recs[0]["cpu_d"]
            series["per_rank_waits"] = [
                {k: vals for k, vals in r.items() if k.startswith("wait")} for r in recs
            ]
            out[variant.name] = series
        single_all = [None] * self.cp
        dist.all_gather_object(single_all, single_cpu, group=self.group)
        out["sdpa_1thread_cpu"] = single_all[0]
        return out

    def _overlap_fns(self, variant: Variant) -> dict[str, Callable[[], dict[str, float]]]:
        loc = self.local[variant.layout]
        q, k, v, dout = loc["q"], loc["k"], loc["v"], loc["dout"]
        causal, scale = self.cfg.causal, self.cfg.scale
        kv = torch.stack([k, v])  # (2, B, Hkv, S_local, D): what both rings send
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        dkv = torch.zeros(kv.shape, dtype=acc)  # dK/dV accumulators travel in fp32
        dkv_per_rank = torch.zeros((self.cp, *kv.shape), dtype=acc) if variant.comm == "allgather" else dkv
        if variant.kind == "cpd":

            def real() -> dict[str, float]:
                transport = TimedTransport(self.group)
                cpd_direct_step(variant, q, k, v, dout, transport, causal, scale)
                names = {
                    f"tag{KV_TAG}": "wait_kv",
                    f"tag{DKV_TAG}": "wait_dkv",
                    "collective": "wait_collective",
                }
                return {"wait": transport.wait_seconds} | {
                    names[kind]: s for kind, s in transport.wait_by_kind.items()
                }

            def local_copies() -> dict[str, float]:
                cpd_direct_step(variant, q, k, v, dout, LocalCopyTransport(self.rank, self.cp), causal, scale)
                return {}

            def comm_only() -> dict[str, float]:
                cpd_comm_only(variant, ProcessGroupTransport(self.group), kv, dkv, dkv_per_rank)
                return {}

            shards = (
                [
                    [
                        shard_sequence_for_rank(self.full[n], r, self.cp, 2, variant.layout)
                        for n in ("q", "k", "v", "dout")
                    ]
                    for r in range(self.cp)
                ]
                if self.rank == 0
                else []
            )

            def serial_compute() -> dict[str, float]:
                for r, (qr, kr, vr, dr) in enumerate(shards):
                    cpd_direct_step(variant, qr, kr, vr, dr, LocalCopyTransport(r, self.cp), causal, scale)
                return {}

            return {"a": real, "b": local_copies, "c": comm_only, "d": serial_compute}

        spec = self._torch_spec(variant)
        kv_flat = torch.cat([k.flatten(), v.flatten()])  # PyTorch's rotaters send flat buffers
        dkv_flat = torch.zeros(kv_flat.numel(), dtype=torch.float32)

        def torch_step() -> None:
            out, lse = torch_ring_forward(q, k, v, spec)
            torch_ring_backward(dout, q, k, v, out, lse, spec)

        def torch_real() -> dict[str, float]:
            meter = CollectiveMeter(self.rank)
            with meter:
                torch_step()
            return {"wait": meter.wait_seconds}

        def torch_local() -> dict[str, float]:
            with LocalCollectivesMode():
                torch_step()
            return {}

        def torch_comm() -> dict[str, float]:
            with torch_cp_options(spec.rotate_method, spec.load_balance):
                torch_rotater_comm_only(spec, kv_flat, dkv_flat)
            return {}

        return {"a": torch_real, "b": torch_local, "c": torch_comm}

    # -- 4. optional profile: where the time of one step goes --------------------------------------------

    def profile(self) -> dict[str, Any]:
        """Where the time of one real-ring step goes, per rank: kernels, other ops, waits, the rest.

        Runs the overlap measurement's (a) step (real communication, waits timed) once under
        ``torch.profiler``: kernel = self time of the CPU flash forward/backward ops; other ops = self time
        of every other aten/c10d op (merge, packing, accumulation, copies); wait = time blocked in
        communication; rest = wall - all of these (Python, autograd, scheduling).
        """
        from torch.profiler import ProfilerActivity, profile

        out: dict[str, Any] = {}
        for variant in (v for v in self.variants if v.kind in CP_KINDS):
            step = self._overlap_fns(variant)["a"]
            step()  # warm
            dist.barrier(self.group)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                waits = step()
                wall = time.perf_counter() - t0
            rows = [
                (e.key, e.self_cpu_time_total / 1e6, e.count)
                for e in prof.key_averages()
                if e.key.startswith("aten::")  # c10d ops are communication: their time overlaps the waits
            ]
            is_kernel = "scaled_dot_product_flash_attention_for_cpu"
            kernel = sum(t for name, t, _ in rows if is_kernel in name)
            others = sorted((r for r in rows if is_kernel not in r[0]), key=lambda r: -r[1])
            other = sum(t for _, t, _ in others)
            out[variant.name] = {
                "wall_s": wall,
                "kernel_s": kernel,
                "other_ops_s": other,
                "wait_s": waits.get("wait", 0.0),
                "waits": waits,
                "rest_s": wall - kernel - other - waits.get("wait", 0.0),
                "top_other_ops": [{"op": n, "self_s": t, "calls": c} for n, t, c in others[:8]],
            }
        per_rank = [None] * self.cp
        dist.all_gather_object(per_rank, out, group=self.group)
        return {"per_rank": per_rank}


def _torch_head_tail_indices(seq_len: int, cp: int) -> torch.Tensor:
    from torch.distributed.tensor.experimental._context_parallel import _HeadTailLoadBalancer

    return _HeadTailLoadBalancer(seq_len, cp, "cpu")._generate_indices()[0].to(torch.int64)


def _diffs(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | None) -> dict[str, float]:
    assert ref is not None
    return {n: (got[n].double() - ref[n].double()).abs().max().item() for n in ("out", "dq", "dk", "dv")}


def _worker(cfg_dict: dict[str, Any], result_path: str) -> None:
    """Entry of every spawned rank: run each sequence length; rank 0 writes the raw results as JSON."""
    cfg = BenchConfig(
        **{**cfg_dict, "seq_lens": tuple(cfg_dict["seq_lens"]), "variants": tuple(cfg_dict["variants"])}
    )
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    raw: list[dict[str, Any]] = []
    for seq_len in cfg.seq_lens:
        bench = RankBench(cfg, seq_len, mesh)
        entry: dict[str, Any] = {"seq_len": seq_len}
        t0 = time.perf_counter()
        entry["verify"] = bench.verify()
        entry["timing"] = bench.time_all()
        entry["overlap"] = bench.measure_overlap() if cfg.overlap_repeats > 0 else {}
        entry["profile"] = bench.profile() if cfg.profile else {}
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


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def summarize_seq_len(cfg: BenchConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """Turn one sequence length's raw measurements into per-variant metrics and bar checks."""
    seq_len, cp, dtype = raw["seq_len"], cfg.cp, dtype_from_name(cfg.dtype)
    minimum = min_bytes_per_rank(
        batch=cfg.batch, kv_heads=cfg.kv_heads, seq_len=seq_len, head_dim=cfg.head_dim, cp=cp, dtype=dtype
    )
    s_local = seq_len // cp
    lse_bytes = cfg.batch * cfg.heads * s_local * 4
    verify, timing, overlap = raw["verify"], raw["timing"], raw["overlap"]
    single = summarize([r["wall"] for r in timing["sdpa_1thread"]])
    single_cpu = summarize([r["cpu"] for r in timing["sdpa_1thread"]])
    cp1_saved = verify["sdpa_1thread"]["saved_bytes"]
    saved_target = SAVED_BAR * cp1_saved / cp + lse_bytes
    variants: dict[str, Any] = {}
    for variant in build_variants(cp, cfg.causal):
        if variant.name not in timing or variant.name == "load_1min":
            continue
        wall = summarize([r["wall"] for r in timing[variant.name]])
        cpu = summarize([r["cpu"] for r in timing[variant.name]])
        ranks = 1 if variant.kind == "sdpa" else cp
        m: dict[str, Any] = {
            "label": variant.label,
            "kind": variant.kind,
            "layout": variant.layout if variant.kind != "sdpa" else None,
            "comm": variant.comm or None,
            "threads_total": variant.threads if variant.kind == "sdpa" else cp,
            "time_s": wall.as_dict(),
            "speedup": single.median / wall.median,
            "efficiency": single.median / (cp * wall.median),
            "efficiency_best": single.min / (cp * wall.min),
            "cpu_s_all_ranks": cpu.as_dict(),
            "cpu_ratio_vs_single": cpu.median / single_cpu.median,
            "preempted_per_step": summarize([r["preempted"] for r in timing[variant.name]]).median,
            "ranks": ranks,
        }
        v = verify.get(variant.name, {})
        if "max_abs_diff_vs_sdpa" in v:
            m["max_abs_diff_vs_sdpa"] = v["max_abs_diff_vs_sdpa"]
        if "max_abs_diff_vs_cpd_p2p_zigzag" in v:
            m["max_abs_diff_vs_cpd_p2p_zigzag"] = v["max_abs_diff_vs_cpd_p2p_zigzag"]
        if variant.kind == "sdpa" and "saved_bytes" in v:
            m["saved_bytes_per_rank"] = v["saved_bytes"]
        if variant.kind in CP_KINDS:
            pr = v["per_rank"]
            fwd = max(r["bytes_forward"] for r in pr)
            bwd = max(r["bytes_backward"] for r in pr)
            work_f = [r["work_forward"] for r in pr]
            work_b = [r["work_backward"] for r in pr]
            saved = max(r["saved_bytes"] for r in pr)
            m.update(
                bytes_forward_per_rank=fwd,
                bytes_backward_per_rank=bwd,
                bytes_forward_vs_min=fwd / minimum["forward"],
                bytes_backward_vs_min=bwd / minimum["backward"],
                bytes_source=pr[0]["bytes_source"],
                bytes_per_rank_all=[(r["bytes_forward"], r["bytes_backward"]) for r in pr],
                work_forward_per_rank=work_f,
                work_backward_per_rank=work_b,
                work_forward_max_over_mean=max(work_f) / (sum(work_f) / len(work_f)),
                work_backward_max_over_mean=max(work_b) / (sum(work_b) / len(work_b)),
                kernel_calls_forward=pr[0]["kernel_calls_forward"],
                kernel_calls_backward=pr[0]["kernel_calls_backward"],
                saved_bytes_per_rank=saved,
                saved_bytes_vs_target=saved / saved_target,
            )
            if variant.kind == "torch":
                m["bytes_analytic"] = torch_bytes_analytic(cp, minimum["kv_shard"], minimum["dkv_shard"])
            if variant.name in overlap:
                m["overlap"] = o = _overlap_metrics(overlap[variant.name])
                if o["cpu_d_serial_s"] is not None:
                    serial, comm = o["cpu_d_serial_s"]["median"], o["cpu_c_s"]["median"]
                    same_phase = summarize(overlap["sdpa_1thread_cpu"]).median
                    ring = serial / same_phase * single_cpu.median  # scaled to the timing phase
                    m["cpu_breakdown_s"] = {
                        "single_process": single_cpu.median,
                        "single_process_overlap_phase": same_phase,
                        "ring_compute_serial_overlap_phase": serial,
                        "ring_compute_ratio": serial / same_phase,
                        "ring_compute": ring,
                        "communication": comm,
                        "rest_contention": cpu.median - ring - comm,
                        "total_all_ranks": cpu.median,
                    }
        variants[variant.name] = m
    result = {
        "seq_len": seq_len,
        "s_local": s_local,
        "min_bytes_per_rank": minimum,
        "lse_bytes_per_rank": lse_bytes,
        "cp1_saved_bytes": cp1_saved,
        "saved_bytes_target_per_rank": saved_target,
        "head_tail_equals_zigzag": verify["head_tail_equals_zigzag"],
        "load_1min_during_timing": timing.get("load_1min", []),
        "variants": variants,
        "profile": raw.get("profile", {}),
        "bench_seconds": raw.get("bench_seconds"),
    }
    result["checks"] = check_bars(cfg, result)
    return result


def _overlap_metrics(series: dict[str, Any]) -> dict[str, Any]:
    a, b, c, wait = (summarize(series[k]) for k in ("a", "b", "c", "wait"))
    exposed = summarize([x - y for x, y in zip(series["a"], series["b"])])
    return {
        "a_real_s": a.as_dict(),
        "b_local_copies_s": b.as_dict(),
        "c_comm_only_s": c.as_dict(),
        "exposed_a_minus_b_s": exposed.as_dict(),
        "wait_s": wait.as_dict(),
        "cpu_a_s": summarize(series["cpu_a"]).as_dict(),
        "cpu_b_s": summarize(series["cpu_b"]).as_dict(),
        "cpu_c_s": summarize(series["cpu_c"]).as_dict(),
        "cpu_d_serial_s": summarize(series["cpu_d"]).as_dict() if "cpu_d" in series else None,
        "hidden_fraction": hidden_fraction(exposed.median, c.median),
        "hidden_fraction_from_wait": hidden_fraction(wait.median, c.median),
        "exposed_spread_exceeds_comm": (exposed.q3 - exposed.q1) > c.median,
        "per_rank_waits": series.get("per_rank_waits", []),
    }


def check_bars(cfg: BenchConfig, res: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's performance bars for this run, each with the measured figure and pass/fail."""
    checks: list[dict[str, Any]] = []
    vs = res["variants"]
    ours = vs.get("cpd_p2p_zigzag")
    if ours is None:
        return checks

    def add(name: str, value: float, target: str, ok: bool | None, note: str = "") -> None:
        checks.append({"bar": name, "value": value, "target": target, "pass": ok, "note": note})

    eff = ours["efficiency"]
    cores = machine_facts()["usable_cores"] or 0
    oversubscribed = cfg.cp > cores
    ceiling = vs.get("sdpa_cp_threads")
    eff_note = (
        f"machine ceiling: single-process SDPA with {cfg.cp} threads reaches {ceiling['efficiency']:.3f}"
        if ceiling
        else ""
    )
    if oversubscribed:
        eff_note = f"informational: {cfg.cp} ranks on {cores} cores, wall time says little"
    add(
        "p2p zigzag efficiency",
        eff,
        f">= {EFFICIENCY_BAR}",
        None if oversubscribed else eff >= EFFICIENCY_BAR,
        eff_note,
    )
    if "torch_ring_alltoall" in vs:
        theirs = vs["torch_ring_alltoall"]["efficiency"]
        pairs = zip(ours["time_s"]["values"], vs["torch_ring_alltoall"]["time_s"]["values"])
        paired = summarize([x - y for x, y in pairs])
        res["paired_step_diff_vs_torch_alltoall_s"] = paired.as_dict()
        add(
            "p2p zigzag efficiency > PyTorch loop (all-to-all)",
            eff - theirs,
            "> 0",
            eff > theirs,
            f"PyTorch {theirs:.3f}; per-round paired step difference ours - PyTorch: median "
            f"{paired.median * 1e3:+.1f} ms [IQR {paired.q1 * 1e3:+.1f}, {paired.q3 * 1e3:+.1f}]",
        )
    ratio = ours["cpu_ratio_vs_single"]
    add(
        "CPU seconds all ranks / single process",
        ratio,
        f"<= {CPU_RATIO_BAR}",
        ratio <= CPU_RATIO_BAR if oversubscribed else None,
        f"CP={cfg.cp} ranks on {cores} cores"
        if oversubscribed
        else f"informational: the bar is for ranks outnumbering cores ({cfg.cp} ranks, {cores} cores)",
    )
    worst = max(ours["bytes_forward_vs_min"], ours["bytes_backward_vs_min"])
    add("bytes sent per rank / minimum", worst, f"<= {1 + BYTES_BAR}", abs(worst - 1) <= BYTES_BAR)
    if cfg.causal:
        w = ours["work_forward_max_over_mean"]
        add("causal zigzag work max/mean", w, f"<= {WORK_BAR}", w <= WORK_BAR)
    saved = ours["saved_bytes_vs_target"]
    add(
        "saved-for-backward bytes per rank / (1.05 x CP1/CP + lse)",
        saved,
        "<= 1",
        saved <= 1.0,
        f"{format_bytes(ours['saved_bytes_per_rank'])} vs CP=1 {format_bytes(res['cp1_saved_bytes'])}",
    )
    return checks


def _fmt_diff(m: dict[str, Any], key: str) -> str:
    d = m.get(key)
    return f"{max(d.values()):.1e}" if d else "-"


def render_tables(cfg: BenchConfig, res: dict[str, Any]) -> str:
    """Markdown tables (time, communication/memory/work, overlap, checks) of one sequence length."""
    vs = res["variants"]
    cp = cfg.cp
    lines = [f"### S = {res['seq_len']} (S_local = {res['s_local']}, CP = {cp})", ""]
    rows = []
    for name, m in vs.items():
        t, c = m["time_s"], m["cpu_s_all_ranks"]
        rows.append(
            [
                name,
                m["label"],
                m["threads_total"],
                f"{t['median']:.4f}",
                f"{t['min']:.4f}-{t['max']:.4f}",
                f"{t['q1']:.4f}-{t['q3']:.4f}",
                f"{m['speedup']:.3f}",
                f"{m['efficiency']:.3f}",
                f"{m['efficiency_best']:.3f}",
                f"{c['median']:.3f}",
                f"{m['cpu_ratio_vs_single']:.3f}",
                _fmt_diff(m, "max_abs_diff_vs_sdpa"),
            ]
        )
    lines.append(
        markdown_table(
            [
                "variant",
                "description",
                "threads",
                "median s",
                "min-max s",
                "IQR s",
                "speedup",
                f"efficiency (T1/({cp}xT))",
                "eff. of minima",
                "CPU s all ranks",
                "CPU / single",
                "max|diff| vs SDPA",
            ],
            rows,
        )
    )
    mn = res["min_bytes_per_rank"]
    lines += [
        "",
        f"Communication minimum per rank: forward {format_bytes(mn['forward'])} ((CP-1) x K+V shard), backward "
        f"{format_bytes(mn['backward'])} (same KV + (CP-1) x fp32 dK/dV shard). Saved-bytes target per rank: "
        f"1.05 x CP1/CP + lse = {format_bytes(res['saved_bytes_target_per_rank'])} "
        f"(CP=1 saves {format_bytes(res['cp1_saved_bytes'])}).",
        "",
    ]
    rows = []
    for name, m in vs.items():
        if m["kind"] not in CP_KINDS:
            continue
        rows.append(
            [
                name,
                format_bytes(m["bytes_forward_per_rank"]),
                f"{m['bytes_forward_vs_min']:.4f}",
                format_bytes(m["bytes_backward_per_rank"]),
                f"{m['bytes_backward_vs_min']:.4f}",
                "RingStats" if m["kind"] == "cpd" else "counted",
                format_bytes(m["saved_bytes_per_rank"]),
                f"{m['saved_bytes_vs_target']:.3f}",
                f"{m['work_forward_max_over_mean']:.4f}",
                f"{m['work_backward_max_over_mean']:.4f}",
                f"{m['kernel_calls_forward']}/{m['kernel_calls_backward']}",
                _fmt_diff(m, "max_abs_diff_vs_cpd_p2p_zigzag"),
            ]
        )
    lines.append(
        markdown_table(
            [
                "variant",
                "fwd bytes/rank",
                "/min",
                "bwd bytes/rank",
                "/min",
                "bytes from",
                "saved/rank",
                "/target",
                "work max/mean fwd",
                "bwd",
                "kernel calls f/b",
                "max|diff| vs cpd_p2p_zigzag",
            ],
            rows,
        )
    )
    rows = []
    for name, m in vs.items():
        o = m.get("overlap")
        if not o:
            continue
        e = o["exposed_a_minus_b_s"]
        rows.append(
            [
                name,
                f"{o['a_real_s']['median']:.4f}",
                f"{o['b_local_copies_s']['median']:.4f}",
                f"{o['c_comm_only_s']['median']:.4f}",
                f"{e['median']:+.4f} [{e['q1']:+.4f}, {e['q3']:+.4f}]",
                f"{o['hidden_fraction']:.2f}" + (" (noisy)" if o["exposed_spread_exceeds_comm"] else ""),
                f"{o['wait_s']['median']:.4f}",
                f"{o['hidden_fraction_from_wait']:.2f}",
                f"{o['cpu_a_s']['median']:.3f} / {o['cpu_b_s']['median']:.3f} / {o['cpu_c_s']['median']:.3f}",
            ]
        )
    if rows:
        lines += [
            "",
            "Hidden communication (Note [Hidden communication] in scripts/_bench_common.py): a = real ring, "
            "b = same compute with every transfer replaced by a local copy, c = the same messages alone; "
            "hidden = 1 - median(a - b) / c, clipped to [0, 1] ('noisy' when the IQR of a - b exceeds c). "
            "wait = time blocked in communication during a; hidden_wait = 1 - wait / c. "
            "CPU a/b/c = CPU seconds of all ranks in a, b, c (c: what the communication itself costs in CPU).",
            "",
            markdown_table(
                [
                    "variant",
                    "a real s",
                    "b local-copy s",
                    "c comm-only s",
                    "a-b median [IQR]",
                    "hidden",
                    "wait s",
                    "hidden (wait)",
                    "CPU a / b / c s",
                ],
                rows,
            ),
        ]
    rows = []
    for name, m in vs.items():
        b = m.get("cpu_breakdown_s")
        if not b:
            continue
        single = b["single_process"]
        rows.append(
            [
                name,
                f"{single:.3f}",
                f"{b['ring_compute_serial_overlap_phase']:.3f} / {b['single_process_overlap_phase']:.3f} "
                f"= {b['ring_compute_ratio']:.3f}",
                f"{b['ring_compute']:.3f} ({100 * (b['ring_compute'] / single - 1):+.1f}%)",
                *(
                    f"{b[key]:.3f} ({100 * b[key] / single:+.1f}%)"
                    for key in ("communication", "rest_contention")
                ),
                f"{b['total_all_ranks']:.3f} ({100 * (b['total_all_ranks'] / single - 1):+.1f}%)",
            ]
        )
    if rows:
        lines += [
            "",
            "Where the CPU seconds of all ranks go (medians). Ring compute: every rank's ring run one after "
            "the other on rank 0 with local copies (no communication, no oversubscription), divided by a "
            "single-process run made next to it (the machine's speed drifts between phases), times the "
            "timing phase's single process. Communication: CPU of c. Rest: total - both (contention: "
            "context switches and cache refills when ranks outnumber cores, gloo threads, barriers).",
            "",
            markdown_table(
                [
                    "variant",
                    "single s",
                    "serial ring / single (same phase)",
                    "ring compute s",
                    "communication s",
                    "rest s",
                    "total all ranks s",
                ],
                rows,
            ),
        ]
    if res["checks"]:
        lines += ["", "Bars (cp_dtensor p2p zigzag):", ""]
        lines.append(
            markdown_table(
                ["bar", "measured", "target", "result", "note"],
                [
                    [
                        c["bar"],
                        f"{c['value']:.4f}",
                        c["target"],
                        {True: "PASS", False: "FAIL", None: "info"}[c["pass"]],
                        c["note"],
                    ]
                    for c in res["checks"]
                ],
            )
        )
    profile_ranks = (res.get("profile") or {}).get("per_rank")
    if profile_ranks:
        lines += [
            "",
            "Profile of one real-ring step per rank (torch.profiler self CPU time; wait = blocked in "
            "communication; rest = wall - kernel - other ops - wait: Python, autograd, scheduling):",
            "",
        ]
        rows = []
        for vname in profile_ranks[0]:
            for rank, per in enumerate(profile_ranks):
                r = per[vname]
                top = ", ".join(
                    f"{o['op'].split('::')[-1]} {o['self_s'] * 1e3:.0f}ms" for o in r["top_other_ops"][:4]
                )
                rows.append(
                    [
                        vname,
                        rank,
                        f"{r['wall_s']:.3f}",
                        f"{r['kernel_s']:.3f}",
                        f"{r['other_ops_s']:.3f}",
                        f"{r['wait_s']:.3f}",
                        f"{r['rest_s']:.3f}",
                        top,
                    ]
                )
        lines.append(
            markdown_table(
                ["variant", "rank", "wall s", "kernel s", "other ops s", "wait s", "rest s", "top other ops"],
                rows,
            )
        )
    lines.append(
        f"\nhead-tail (PyTorch) chunk assignment == cp_dtensor zigzag: {res['head_tail_equals_zigzag']}; "
        f"benchmark wall time for this S: {res['bench_seconds']:.1f}s"
    )
    loads = res["load_1min_during_timing"]
    preempted = {n: m["preempted_per_step"] for n, m in vs.items()}
    lines.append(
        f"1-min load average during the timed rounds: {', '.join(f'{x:.2f}' for x in loads)} "
        f"(this run's own ranks contribute up to {cp}); involuntary context switches per step (all ranks, "
        f"median): {', '.join(f'{n} {int(x)}' for n, x in preempted.items())}"
    )
    return "\n".join(lines)


def plot_results(report: dict[str, Any], path: Path) -> None:
    """Efficiency and median step time against S; matplotlib is imported only here."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise SystemExit(
            f"--plot needs matplotlib ({e}); install it with `pip install matplotlib` or "
            f"`pip install -e '.[plot]'`, or run without --plot."
        ) from None
    results = report["results"]
    seq = [r["seq_len"] for r in results]
    names = list(results[0]["variants"])
    fig, (ax_eff, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        eff = [r["variants"][name]["efficiency"] for r in results]
        t = [r["variants"][name]["time_s"]["median"] for r in results]
        if name != "sdpa_1thread":
            ax_eff.plot(seq, eff, marker="o", color=colors(i), label=name)
        ax_t.plot(seq, t, marker="o", color=colors(i), label=name)
    cfg = report["config"]
    ax_eff.axhline(EFFICIENCY_BAR, color="gray", ls="--", lw=1, label=f"bar {EFFICIENCY_BAR}")
    ax_eff.set(
        xlabel="global sequence length S",
        ylabel="efficiency T1 / (CP x T)",
        xscale="log",
        title="parallel efficiency",
    )
    ax_t.set(
        xlabel="global sequence length S",
        ylabel="fwd+bwd step time (s, median)",
        xscale="log",
        yscale="log",
        title="step time",
    )
    for ax in (ax_eff, ax_t):
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(seq, [str(s) for s in seq])
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(
        f"CP={cfg['cp']} B={cfg['batch']} Hq={cfg['heads']} Hkv={cfg['kv_heads']} D={cfg['head_dim']} {cfg['dtype']} "
        f"{'causal' if cfg['causal'] else 'bidirectional'} - {report['machine']['cpu_model']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# CUDA path (minimal; one GPU; exercised by scripts/check_cuda.sh, not by CI)
# ----------------------------------------------------------------------------------------------------

_CUDA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def run_cuda(args: argparse.Namespace, header: dict[str, Any]) -> dict[str, Any]:
    """One GPU: simulated CP ring (every rank in one process) vs one monolithic SDPA, per CUDA backend."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False).")
    dtype = dtype_from_name(args.dtype)
    dev = torch.device("cuda")
    scale = 1.0 / math.sqrt(args.head_dim)
    results = []
    for seq_len in args.seq_len:
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        shape_q = (args.batch, args.heads, seq_len, args.head_dim)
        shape_kv = (args.batch, args.kv_heads, seq_len, args.head_dim)
        q, dout = (torch.randn(shape_q, generator=gen, device=dev, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(shape_kv, generator=gen, device=dev, dtype=dtype) for _ in range(2))
        for backend in args.backends:
            if backend in ("flash", "cudnn") and dtype not in (torch.float16, torch.bfloat16):
                results.append(
                    {"seq_len": seq_len, "backend": backend, "skipped": f"{backend} needs fp16/bf16"}
                )
                continue

            inputs = (q, k, v, dout)

            def mono(
                backend: str = backend, inputs: tuple[torch.Tensor, ...] = inputs
            ) -> dict[str, torch.Tensor]:
                qq, kk, vv = (t.detach().requires_grad_(True) for t in inputs[:3])
                # GQA by repeating KV heads (the fused kernels take no enable_gqa for dense inputs),
                # as the ring's kernel adapters do per block.
                n_rep = args.heads // args.kv_heads
                k_full, v_full = (t.repeat_interleave(n_rep, dim=1) for t in (kk, vv))
                with sdpa_kernel(_CUDA_BACKENDS[backend]):
                    o = F.scaled_dot_product_attention(qq, k_full, v_full, is_causal=args.causal, scale=scale)
                o.backward(inputs[3])
                return {"out": o.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad}

            def sim(backend: str = backend, inputs: tuple[torch.Tensor, ...] = inputs) -> Any:
                return cp_dtensor.simulate_context_parallel_attention(
                    *inputs[:3],
                    args.cp,
                    grad_out=inputs[3],
                    is_causal=args.causal,
                    scale=scale,
                    layout="zigzag",
                    comm="p2p",
                    backend=backend,
                )

            def cuda_time(fn: Callable[[], Any]) -> tuple[list[float], Any]:
                times, res = [], None
                for i in range(args.warmup + args.repeats):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    res = fn()
                    torch.cuda.synchronize()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                return times, res

            try:
                t_mono, ref = cuda_time(mono)
                t_sim, got = cuda_time(sim)
            except RuntimeError as e:  # a backend that does not support this shape/dtype/GPU
                results.append({"seq_len": seq_len, "backend": backend, "skipped": str(e).splitlines()[0]})
                continue
            diffs = {
                n: (getattr(got, n).double() - ref[n].double()).abs().max().item()
                for n in ("out", "dq", "dk", "dv")
            }
            minimum = min_bytes_per_rank(
                batch=args.batch,
                kv_heads=args.kv_heads,
                seq_len=seq_len,
                head_dim=args.head_dim,
                cp=args.cp,
                dtype=dtype,
            )
            work = [s.score_elements_forward for s in got.stats]
            results.append(
                {
                    "seq_len": seq_len,
                    "backend": backend,
                    "monolithic_s": summarize(t_mono).as_dict(),
                    "simulated_ring_s": summarize(t_sim).as_dict(),
                    "ring_over_monolithic": summarize(t_sim).median / summarize(t_mono).median,
                    "max_abs_diff": diffs,
                    "bytes_forward_vs_min": max(s.bytes_sent_forward for s in got.stats)
                    / max(minimum["forward"], 1),
                    "bytes_backward_vs_min": max(s.bytes_sent_backward for s in got.stats)
                    / max(minimum["backward"], 1),
                    "work_max_over_mean": max(work) / (sum(work) / len(work)),
                }
            )
    rows = [
        [r["seq_len"], r["backend"], "skipped: " + r["skipped"], "", "", "", ""]
        if "skipped" in r
        else [
            r["seq_len"],
            r["backend"],
            f"{r['monolithic_s']['median']:.5f}",
            f"{r['simulated_ring_s']['median']:.5f}",
            f"{r['ring_over_monolithic']:.3f}",
            f"{max(r['max_abs_diff'].values()):.2e}",
            f"{r['bytes_forward_vs_min']:.3f}/{r['bytes_backward_vs_min']:.3f}",
        ]
        for r in results
    ]
    print(
        markdown_table(
            [
                "S",
                "backend",
                "monolithic SDPA s",
                f"simulated CP={args.cp} ring s",
                "ring/mono",
                "max|diff|",
                "bytes/min f/b",
            ],
            rows,
        )
    )
    return {**header, "device": "cuda", "gpu": torch.cuda.get_device_name(), "cuda_results": results}


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", "-b", type=int, default=1, help="batch size B")
    p.add_argument("--heads", type=int, default=8, help="query heads Hq")
    p.add_argument(
        "--kv-heads", type=int, default=None, help="key/value heads Hkv (default Hq; Hq %% Hkv == 0)"
    )
    p.add_argument("--head-dim", type=int, default=64, help="head dim D")
    p.add_argument(
        "--seq-len", type=int, nargs="+", default=[8192], help="global sequence length(s) S (a sweep)"
    )
    p.add_argument("--cp", type=int, default=2, help="CP degree = number of spawned ranks (one thread each)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    mask = p.add_mutually_exclusive_group()
    mask.add_argument(
        "--causal", dest="causal", action="store_true", default=True, help="causal mask (default)"
    )
    mask.add_argument("--bidirectional", dest="causal", action="store_false", help="no mask")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed warmup rounds before timing")
    p.add_argument(
        "--overlap-repeats",
        type=int,
        default=None,
        help="repeats of the hidden-communication measurement (a/b/c); default --repeats, 0 skips it",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(ALL_VARIANT_NAMES),
        choices=list(ALL_VARIANT_NAMES),
        help="subset of variants (sdpa_1thread, the baseline, is always run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", action="store_true", help="also profile one step per CP variant (time breakdown)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the full results as JSON here")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="write a PNG of efficiency and time against S (default path: --out with .png, or bench_attention.png)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: the distributed benchmark (gloo). cuda: one GPU, "
        "simulated CP ring vs monolithic SDPA for each --backends",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=["flash", "cudnn", "efficient"],
        choices=sorted(_CUDA_BACKENDS),
        help="CUDA backends for --device cuda",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="process-group timeout in seconds")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.overlap_repeats is None:
        args.overlap_repeats = args.repeats
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.cp < 2:
        p.error(f"--cp must be >= 2 (got {args.cp}); CP=1 is the single-process SDPA baseline")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    for s in args.seq_len:
        try:
            validate_seq_len(s, args.cp, "zigzag")
        except ValueError as e:
            p.error(str(e))
    if "sdpa_1thread" not in args.variants:
        args.variants.append("sdpa_1thread")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report, write JSON (and a plot); return the report."""
    args = parse_args(argv)
    command = shlex.join(sys.orig_argv if argv is None else [sys.executable, __file__, *argv])
    facts = machine_facts()
    header = {"command": command, "machine": facts}
    print("# bench_attention: context-parallel attention, forward + backward\n")
    print(f"command: `{command}`")
    print(
        f"machine: {facts['cpu_model']}, {facts['cpu_count']} cores ({facts['usable_cores']} usable), "
        f"torch {facts['torch']}, python {facts['python']}, {facts['platform']}, {facts['date_utc']}, "
        f"load average at start {facts['load_average_at_start']}\n",
        flush=True,
    )
    if args.device == "cuda":
        report = run_cuda(args, header)
    else:
        cfg = BenchConfig(
            batch=args.batch,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            seq_lens=tuple(args.seq_len),
            cp=args.cp,
            dtype=args.dtype,
            causal=args.causal,
            repeats=args.repeats,
            warmup=args.warmup,
            overlap_repeats=args.overlap_repeats,
            variants=tuple(n for n in ALL_VARIANT_NAMES if n in args.variants),
            seed=args.seed,
            profile=args.profile,
        )
        print(
            f"config: B={cfg.batch} Hq={cfg.heads} Hkv={cfg.kv_heads} D={cfg.head_dim} S={list(cfg.seq_lens)} "
            f"CP={cfg.cp} {cfg.dtype} {'causal' if cfg.causal else 'bidirectional'}, repeats={cfg.repeats} "
            f"warmup={cfg.warmup} overlap_repeats={cfg.overlap_repeats}; CP variants: {cfg.cp} spawned gloo ranks "
            f"x 1 intra-op thread; step time = max over ranks after a barrier; CPU = sum of process_time over "
            f"ranks; single-process SDPA runs on rank 0 while the other ranks block in a barrier.\n",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="bench_attention_") as tmp:
            raw_path = Path(tmp) / "raw.json"
            run_distributed(
                _worker, cfg.cp, asdict(cfg), str(raw_path), threads_per_rank=1, timeout_s=args.timeout
            )
            raw = json.loads(raw_path.read_text())
        facts["load_average_at_end"] = os.getloadavg()
        results = [summarize_seq_len(cfg, r) for r in raw]
        report = {**header, "device": "cpu", "config": asdict(cfg), "results": results}
        print(f"load average at end: {facts['load_average_at_end']}\n")
        for res in results:
            print(render_tables(cfg, res) + "\n")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    if args.plot is not None and args.device == "cpu":
        path = (
            Path(args.plot)
            if args.plot
            else (args.out.with_suffix(".png") if args.out else Path("bench_attention.png"))
        )
        plot_results(report, path)
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
