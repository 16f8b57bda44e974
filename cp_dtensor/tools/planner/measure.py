"""Measure this machine and write a calibrated :class:`~.hardware.Hardware` preset (``plan.py --calibrate``).

:func:`calibrate_machine` spawns ``ranks`` local gloo processes (one intra-op thread each, as
``scripts/bench_train.py`` runs them), measures on all of them at once, and returns the calibration file
(Note [Calibration file], ``calibration.py``) whose ``"hardware"`` section replaces the ``cpu`` preset's
guesses. Note [Machine calibration] says what is measured and how it becomes the preset's fields.

Note [Machine calibration]
~~~~~~~~~~~~~~~~~~~~~~~~~~
A CPU "device" is one rank of a local run of ``ranks`` processes, one intra-op thread each. Every rank
measures at the same time, as the ranks of a training run share the cores. Compute is timed in CPU
seconds of the calling thread (``time.thread_time``), so a preemption by the OS does not count; the part
of a core a rank actually gets, the *core share* (its CPU seconds over wall seconds while every rank
computes: 0.5 for 4 ranks on 2 idle cores, less when other jobs load the machine), turns CPU rates into
the wall-clock rates of the preset. Communication is timed in wall seconds. Each number is the median of
``repeats`` timings (more for cheap calls) per rank, then the median over ranks::

    phase        every rank at once                      fitted (least squares)        Hardware fields
    matmul       x @ w.T, dy @ w, dy.T @ x at the         FLOP / CPU s, median over     peak_flops,
                 flavor's linear shapes (fp32, bf16)      shapes, x share               matmul_efficiency
    attention    CPU flash kernel fwd and bwd, causal     t = t_call + n * t_e per      attention_(backward_)
                 and not, at a few (S, heads), the        pass and mask; n = visible    efficiency, causal_
                 flavor's head dim                        score elements (all heads)    attention_factor,
                                                                                        kernel_call_overhead_s
    block        one plain block of the flavor, fwd and   rest = a + e*T (fwd),         layer_overhead_s = a,
                 bwd at 2 token counts, minus its mm and   a + 2e*T (bwd)               elementwise_bandwidth =
                 attention kernels timed op by op                                       saved bytes/token / e
    p2p ring     isend/irecv to the next rank, from the   t = lat + size / bw;          intra/inter_node_
                 previous, 4 B .. 4 MiB; process CPU s    CPU s = c + 2 size * k        bandwidth, _latency_s,
                 (gloo's own threads included)                                          comm_compute_bandwidth
    p2p pair     the same between ranks 0 and 1 only      (reported, not used)
    collectives  all-gather, reduce-scatter over all      t = (n-1)/n size / bw +       collective_bandwidth,
                 ranks and over pairs                     (n-1) lat                     collective_latency_s

Every compute field is a CPU quantity times the core share (rates) or over it (times):
``attention_efficiency = 4 hd / t_e(fwd, unmasked) * share / peak_flops``; the backward counts
``CostOptions.attention_backward_factor`` (2.5) forwards of FLOPs; ``causal_attention_factor`` is the
causal over the unmasked ``t_e`` (fwd + bwd); ``peak_flops`` is the fastest of the three kernel rates.
``comm_compute_bandwidth = share / k``: on loopback gloo a byte sent or received costs the rank ``k`` CPU
seconds of copying, which no overlap hides. The preset is as good as the load it was measured under:
calibrate right before the run it should predict, and compare the core share and the load average.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from cp_dtensor.cost.hardware import build_hardware
from cp_dtensor.models.llama import LLAMA3_FLAVORS, ModelArgs, RotaryEmbedding, TransformerBlock
from cp_dtensor.tools.planner.formulas import activation_bytes_per_token_layer
from cp_dtensor.tools.planner.options import CostOptions
from cp_dtensor.tools.planner.shapes import ModelShape

__all__ = ["ProbeSpec", "calibrate_machine", "fit_line", "flavor_of", "hardware_from_probe"]

_OP = "_scaled_dot_product_flash_attention_for_cpu"
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class ProbeSpec:
    """What :func:`calibrate_machine` measures.

    Attributes:
        ranks: Local processes measured at once (``scripts/bench_train.py`` runs 4).
        flavor: Llama flavor whose shapes are measured (``LLAMA3_FLAVORS``): the matmuls of its linears,
            the kernel at its head size, one of its blocks.
        tokens: Rows of the matmul shapes (a typical shard length).
        attention_shapes: ``(S, heads)`` of the attention timings (square blocks).
        sizes: Message sizes (bytes) of the p2p and collective timings.
        repeats: Timings per measurement (the median is kept).
        dtypes: Matmul dtypes; the first is the compute dtype of the preset.
        layer_tokens: Token counts of the single-block timings (empty: skip them); two or more.
        base: Preset whose other fields (memory, nodes) the calibrated one keeps.
    """

    ranks: int = 4
    flavor: str = "small"
    tokens: int = 1024
    attention_shapes: tuple[tuple[int, int], ...] = ((256, 8), (512, 8), (1024, 4), (2048, 2))
    sizes: tuple[int, ...] = (4, 65536, 1 << 20, 4 << 20)
    repeats: int = 5
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    layer_tokens: tuple[int, ...] = (256, 1024)
    base: str = "cpu"

    def __post_init__(self) -> None:
        if self.flavor not in LLAMA3_FLAVORS:
            raise ValueError(f"ProbeSpec.flavor {self.flavor!r} is not one of {sorted(LLAMA3_FLAVORS)}")
        if self.ranks < 2:
            raise ValueError(f"ProbeSpec.ranks must be >= 2 (the links are measured), got {self.ranks}")
        if len(self.attention_shapes) < 2 or len(self.sizes) < 2 or len(self.layer_tokens) == 1:
            raise ValueError(
                "ProbeSpec needs >= 2 attention_shapes and sizes, and 0 or >= 2 layer_tokens (two-term fits), "
                f"got {self.attention_shapes}, {self.sizes}, {self.layer_tokens}"
            )
        if not self.dtypes or any(d not in _BYTES for d in self.dtypes):
            raise ValueError(f"ProbeSpec.dtypes must be some of {sorted(_BYTES)}, got {self.dtypes}")

    @property
    def model_args(self) -> ModelArgs:
        """The flavor's :class:`~cp_dtensor.models.llama.ModelArgs`."""
        return LLAMA3_FLAVORS[self.flavor]

    @classmethod
    def quick(cls, ranks: int = 2) -> ProbeSpec:
        """Tiny sizes for a smoke test (seconds, not a calibration)."""
        return cls(
            ranks=ranks,
            flavor="debug",
            tokens=128,
            attention_shapes=((64, 2), (128, 2)),
            sizes=(4, 4096, 65536),
            repeats=2,
            dtypes=("float32",),
            layer_tokens=(32, 64),
        )


def flavor_of(model: str) -> str:
    """The ``LLAMA3_FLAVORS`` key of a planner model name (``small``, ``llama3_small``, ``Llama3_8B``)."""
    name = model.strip()
    name = name[len("llama3_") :] if name.lower().startswith("llama3_") else name
    by_lower = {k.lower(): k for k in LLAMA3_FLAVORS}
    if name.lower() not in by_lower:
        raise ValueError(
            f"--calibrate measures a Llama flavor; got {model!r}, choose from {sorted(LLAMA3_FLAVORS)}"
        )
    return by_lower[name.lower()]


def fit_line(xs: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Non-negative least squares of ``y = sum_j c_j * x_j`` (2 or 3 unknowns; a clamped coefficient is 0).

    Args:
        xs: One row of regressors per observation.
        ys: Observations.

    Returns:
        The coefficients ``c_j >= 0``.
    """
    a = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    # relative errors matter (sizes span 6 decades): weight each row by 1 / y
    w = 1.0 / y.clamp_min(1e-12)
    coef = torch.linalg.lstsq(a * w[:, None], y * w).solution
    if (coef < 0).any():  # refit without the negative terms
        keep = coef >= 0
        sub = torch.linalg.lstsq((a * w[:, None])[:, keep], y * w).solution
        coef = torch.zeros_like(coef)
        coef[keep] = sub.clamp_min(0)
    return coef.tolist()


def _median_time(
    fn: Callable[[], Any],
    repeats: int,
    min_total_s: float = 0.05,
    max_repeats: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds of ``fn()`` by ``clock`` after one warm-up.

    ``repeats`` calls, then more (up to ``max_repeats``) while the calls so far took less than
    ``min_total_s``: cheap calls get many samples, so one preemption by the OS moves the median less. Pass
    ``min_total_s=0`` for communication: every rank must make the same number of calls. Compute is timed
    with ``time.thread_time`` (CPU seconds of the calling thread, which runs the kernels with one intra-op
    thread): time the OS gives to other processes is not counted (Note [Machine calibration]).
    """
    fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < max_repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


_cpu_time = partial(_median_time, clock=time.thread_time)


def _comm_repeats(spec: ProbeSpec, size: int) -> int:
    """Timed calls of a message of ``size`` bytes: the same on every rank; small (cheap) ones get more."""
    return max(spec.repeats, 30 if size <= 65536 else 2 * spec.repeats)


def _linear_matmuls(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> None:
    x @ w.t(), dy @ w, dy.t() @ x  # forward, input gradient, weight gradient


def _probe_matmul(spec: ProbeSpec) -> dict[str, Any]:
    """FLOP/s of the three matmuls of a linear (forward, input grad, weight grad) at the model's shapes."""
    g = torch.Generator().manual_seed(0)
    args = spec.model_args
    h, f, kv, m = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim, spec.tokens
    shapes = [(m, h, h), (m, h, kv), (m, h, f), (m, f, h)]  # (tokens, in, out): wq/wo, wk/wv, w1/w3, w2
    out: dict[str, Any] = {}
    for name in spec.dtypes:
        dtype = getattr(torch, name)
        rates = []
        for m_, k, n in shapes:
            x = torch.randn(m_, k, generator=g).to(dtype)
            w = torch.randn(n, k, generator=g).to(dtype)
            dy = torch.randn(m_, n, generator=g).to(dtype)
            t = _cpu_time(partial(_linear_matmuls, x, w, dy), spec.repeats)
            rates.append(3 * 2.0 * m_ * k * n / t)
        out[name] = {"shapes": shapes, "flops": rates, "median_flops": statistics.median(rates)}
    return out


def _probe_attention(spec: ProbeSpec) -> dict[str, Any]:
    """Forward and backward seconds of the CPU flash kernel per shape, causal and not."""
    op = getattr(torch.ops.aten, _OP)
    op_bwd = getattr(torch.ops.aten, _OP + "_backward")
    g = torch.Generator().manual_seed(0)
    rows = []
    for s, heads in spec.attention_shapes:
        q, k, v, dout = (torch.randn(1, heads, s, spec.model_args.head_dim, generator=g) for _ in range(4))
        for causal in (False, True):
            out, lse = op(q, k, v, 0.0, causal)
            t_f = _cpu_time(partial(op, q, k, v, 0.0, causal), spec.repeats)
            t_b = _cpu_time(partial(op_bwd, dout, q, k, v, out, lse, 0.0, causal), spec.repeats)
            visible = heads * (s * (s + 1) / 2 if causal else s * s)  # score elements (all heads)
            rows.append(
                {"seq": s, "heads": heads, "causal": causal, "elements": visible, "fwd": t_f, "bwd": t_b}
            )
    return {"rows": rows}


def _exchange(t: torch.Tensor, r: torch.Tensor, send_to: int, recv_from: int, group: Any = None) -> None:
    ops = [dist.P2POp(dist.isend, t, send_to, group), dist.P2POp(dist.irecv, r, recv_from, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def _probe_p2p(spec: ProbeSpec, active: Sequence[int]) -> dict[str, float]:
    """Seconds per ring exchange (send to the next active rank, receive from the previous) per size: the
    median wall time (key ``"SIZE"``) and the mean CPU seconds of the process (key ``"cpu SIZE"``)."""
    rank = dist.get_rank()
    out: dict[str, float] = {}
    for size in spec.sizes:
        dist.barrier()
        if rank not in active:
            continue
        i = active.index(rank)
        nxt, prv = active[(i + 1) % len(active)], active[(i - 1) % len(active)]
        send = torch.empty(max(1, size // 4), dtype=torch.float32)
        recv = torch.empty_like(send)
        fn = partial(_exchange, send, recv, nxt, prv)
        reps = _comm_repeats(spec, size)
        c0 = time.process_time()  # every thread of the process: gloo copies on its own threads
        out[str(size)] = _median_time(fn, reps, min_total_s=0)
        out[f"cpu {size}"] = (time.process_time() - c0) / (reps + 1)
    dist.barrier()
    return out


def _probe_collectives(spec: ProbeSpec, groups: dict[int, Any]) -> dict[str, dict[str, float]]:
    """Seconds of all_gather_into_tensor / reduce_scatter_tensor (output / input of ``size`` bytes)."""
    out: dict[str, dict[str, float]] = {}
    for n, group in groups.items():
        for size in spec.sizes:
            elems = max(n, size // 4 // n * n)
            full = torch.zeros(elems)
            shard = torch.zeros(elems // n)
            dist.barrier()
            reps = _comm_repeats(spec, size)
            with warnings.catch_warnings():  # the *_tensor names FSDP and DTensor call are "deprecated"
                warnings.simplefilter("ignore", FutureWarning)
                t_ag = _median_time(partial(dist.all_gather_into_tensor, full, shard, group=group), reps, 0)
                dist.barrier()
                t_rs = _median_time(partial(dist.reduce_scatter_tensor, shard, full, group=group), reps, 0)
            out[f"{n}:{elems * 4}"] = {"n": n, "bytes": elems * 4, "all_gather": t_ag, "reduce_scatter": t_rs}
    dist.barrier()
    return out


class _KernelClock(TorchDispatchMode):
    """CPU seconds spent inside matmul and attention kernels (every other op runs untimed)."""

    _MATMUL = frozenset({"mm", "addmm", "bmm", "matmul", "linear"})

    def __init__(self) -> None:
        super().__init__()
        self.seconds = {"matmul": 0.0, "attention": 0.0}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        kind = "matmul" if name in self._MATMUL else "attention" if name.startswith(_OP) else None
        if kind is None:
            return func(*args, **(kwargs or {}))
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        self.seconds[kind] += time.thread_time() - t0
        return out


def _probe_layer(spec: ProbeSpec) -> list[dict[str, float]]:
    """One plain block of the flavor at each of ``layer_tokens``: CPU seconds of the forward and of the
    backward, and the part of each spent outside the matmul and attention kernels (timed op by op)."""
    args = spec.model_args
    torch.manual_seed(0)
    block = TransformerBlock(0, args)
    rows = []
    for s in spec.layer_tokens:
        x = torch.randn(1, s, args.dim, requires_grad=True)  # (1, S, h)
        rope = RotaryEmbedding(args.head_dim, args.rope_theta)(torch.arange(s)[None])  # (1, S, hd/2, 2)
        t_fwd = _cpu_time(partial(block, x, rope), spec.repeats)

        def step(x: torch.Tensor = x, rope: torch.Tensor = rope) -> None:
            block(x, rope).sum().backward()

        t_step = _cpu_time(step, spec.repeats)
        kernels = []
        for _ in range(spec.repeats):
            with _KernelClock() as fwd_clock:
                out = block(x, rope).sum()
            with _KernelClock() as bwd_clock:
                out.backward()
            kernels.append((sum(fwd_clock.seconds.values()), sum(bwd_clock.seconds.values())))
        k_fwd = statistics.median(k[0] for k in kernels)
        k_bwd = statistics.median(k[1] for k in kernels)
        rows.append(
            {"tokens": s, "fwd": t_fwd, "bwd": t_step - t_fwd, "kernels_fwd": k_fwd, "kernels_bwd": k_bwd}
        )
    return rows


def _probe_rank(spec: ProbeSpec, out_file: str) -> None:
    """Run every phase on this rank; rank 0 writes every rank's results."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [list(range(i, min(i + 2, world))) for i in range(0, world, 2)]
    pair_groups = [dist.new_group(p) for p in pairs]
    my_pair = next(g for p, g in zip(pairs, pair_groups) if rank in p)
    groups = {world: dist.group.WORLD}
    if world > 2 and all(len(p) == 2 for p in pairs):
        groups[2] = my_pair
    res: dict[str, Any] = {"rank": rank}
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    res["matmul"] = _probe_matmul(spec)
    res["attention"] = _probe_attention(spec)
    if spec.layer_tokens:
        res["layer"] = _probe_layer(spec)
    # the part of a core this rank got while every rank computed
    res["core_share"] = min(1.0, (time.process_time() - c0) / (time.perf_counter() - t0))
    res["p2p_ring"] = _probe_p2p(spec, list(range(world)))
    res["p2p_pair"] = _probe_p2p(spec, [0, 1])
    res["collectives"] = _probe_collectives(spec, groups)
    res["seconds"] = time.perf_counter() - t0
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


def hardware_from_probe(spec: ProbeSpec, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit the :class:`Hardware` fields (Note [Machine calibration]) from every rank's raw timings.

    Args:
        spec: What was measured.
        per_rank: ``_probe_rank``'s results, one per rank.

    Returns:
        ``{"hardware": {field: value}, "fits": {...}}``: the overrides of the base preset and the fitted
        raw quantities (CPU rates, the core share, seconds per score element and per call, bandwidths).
    """

    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(r) for r in per_rank)

    model = ModelShape.from_model_args(spec.model_args)
    share = med(lambda r: r["core_share"])
    fits: dict[str, Any] = {"core_share": share}
    # ---- compute, in CPU seconds of one core (divided by the share below) ----
    cpu_mm = {d: med(lambda r, d=d: r["matmul"][d]["median_flops"]) for d in spec.dtypes}
    fits["matmul_flops_per_cpu_second"] = cpu_mm
    rows = per_rank[0]["attention"]["rows"]
    # t = t_call + elements * t_e per (pass, causal): CPU seconds per call and per visible score element
    att: dict[tuple[str, bool], list[float]] = {}
    for key in ("fwd", "bwd"):
        for causal in (False, True):
            idx = [i for i, row in enumerate(rows) if row["causal"] == causal]
            ys = [med(lambda r, i=i, k=key: r["attention"]["rows"][i][k]) for i in idx]
            att[key, causal] = fit_line([[1.0, rows[i]["elements"]] for i in idx], ys)
    fits["attention_cpu_s_per_element"] = {
        f"{key} {'causal' if c else 'full'}": att[key, c][1] for key in ("fwd", "bwd") for c in (False, True)
    }
    fits["attention_cpu_s_per_call"] = {
        f"{key} {'causal' if c else 'full'}": att[key, c][0] for key in ("fwd", "bwd") for c in (False, True)
    }
    flops_per_element = 4.0 * model.head_dim  # QK^T and PV, one head
    bwd_factor = CostOptions().attention_backward_factor
    mm_rate = cpu_mm[spec.dtypes[0]] * share
    at_rate = flops_per_element / max(att["fwd", False][1], 1e-15) * share
    at_bwd_rate = bwd_factor * flops_per_element / max(att["bwd", False][1], 1e-15) * share
    causal_factor = (att["fwd", True][1] + att["bwd", True][1]) / max(
        att["fwd", False][1] + att["bwd", False][1], 1e-15
    )
    cpu_call = statistics.mean(fit[0] for fit in att.values())  # per call, a forward or a backward
    peak = max(mm_rate, at_rate, at_bwd_rate)  # "peak": the fastest kernel measured
    hw: dict[str, Any] = {
        "name": f"calibrated {spec.base} ({spec.ranks} ranks)",
        "peak_flops": peak,
        "matmul_efficiency": mm_rate / peak,
        "attention_efficiency": at_rate / peak,
        "attention_backward_efficiency": at_bwd_rate / peak,
        "causal_attention_factor": max(1.0, causal_factor),
        "kernel_call_overhead_s": cpu_call / share,
        "layer_overhead_s": 0.0,
    }
    if per_rank[0].get("layer"):
        # what a block costs beyond its matmul and attention kernels (timed op by op): per pass a + e*T
        # forward, a + 2e*T backward (elementwise work streams the activations; backward about twice)
        xs, ys = [], []
        for i, row in enumerate(per_rank[0]["layer"]):
            s = float(row["tokens"])
            xs += [[1.0, s], [1.0, 2.0 * s]]
            ys += [
                med(lambda r, i=i, p=p: r["layer"][i][p] - r["layer"][i][f"kernels_{p}"])
                for p in ("fwd", "bwd")
            ]
        fixed, per_token = fit_line(xs, [max(y, 1e-9) for y in ys])
        act = activation_bytes_per_token_layer(
            model, 1, CostOptions.cp_dtensor(dtype_bytes=_BYTES[spec.dtypes[0]])
        )
        hw["layer_overhead_s"] = fixed / share
        if per_token > 0:
            hw["elementwise_bandwidth"] = act * share / per_token
        fits["layer_cpu_s"] = {
            "fixed_per_pass": fixed,
            "per_token_forward": per_token,
            "bytes_per_token": act,
            "rest": dict(
                zip([f"{r['tokens']} {p}" for r in per_rank[0]["layer"] for p in ("fwd", "bwd")], ys)
            ),
        }
    # ---- communication, wall seconds ----
    sizes = sorted(int(x) for x in per_rank[0]["p2p_ring"] if not x.startswith("cpu"))
    for key, ranks in (("p2p_ring", per_rank), ("p2p_pair", [r for r in per_rank if r["p2p_pair"]])):
        secs = [statistics.median(r[key][str(x)] for r in ranks) for x in sizes]
        lat, inv_bw = fit_line([[1.0, float(x)] for x in sizes], secs)
        if inv_bw <= 0:  # noise flattened the fit: the largest message's time bounds the bandwidth
            inv_bw = secs[-1] / sizes[-1]
        fits[key] = {"latency_s": lat, "bandwidth": 1.0 / inv_bw, "seconds": dict(zip(sizes, secs))}
    cxs, cys = [], []  # t = (n-1)/n size / bw + (n-1) lat, all-gather and reduce-scatter pooled
    for key, row in per_rank[0]["collectives"].items():
        n, size = row["n"], row["bytes"]
        for kind in ("all_gather", "reduce_scatter"):
            cxs.append([(n - 1) / n * size, float(n - 1)])
            cys.append(med(lambda r, k=key, c=kind: r["collectives"][k][c]))
    c_inv_bw, c_lat = fit_line(cxs, cys)
    if c_inv_bw <= 0:  # as above: the largest collective bounds it
        c_inv_bw = max(y / x[0] for x, y in zip(cxs, cys))
    fits["collectives"] = {"latency_s": c_lat, "bandwidth": 1.0 / c_inv_bw}
    # the CPU a rank spends moving bytes (loopback: copies through the kernel, on the cores that compute)
    cpu = [med(lambda r, x=x: r["p2p_ring"][f"cpu {x}"]) for x in sizes]
    _, cpu_per_byte = fit_line([[1.0, 2.0 * x] for x in sizes], cpu)  # each exchange sends and receives
    fits["p2p_ring"]["cpu_s_per_byte"] = cpu_per_byte
    ring = fits["p2p_ring"]
    hw.update(
        intra_node_bandwidth=ring["bandwidth"],
        inter_node_bandwidth=ring["bandwidth"],
        intra_node_latency_s=ring["latency_s"],
        inter_node_latency_s=ring["latency_s"],
        collective_bandwidth=fits["collectives"]["bandwidth"],
        collective_latency_s=c_lat,
    )
    if cpu_per_byte > 0:
        hw["comm_compute_bandwidth"] = share / cpu_per_byte
    return {"hardware": hw, "fits": fits}


def calibrate_machine(spec: ProbeSpec | None = None, *, timeout_s: float = 300.0) -> dict[str, Any]:
    """Measure this machine with ``spec.ranks`` local processes (Note [Machine calibration]).

    Args:
        spec: What to measure (default :class:`ProbeSpec`).
        timeout_s: Process-group timeout.

    Returns:
        A calibration file (Note [Calibration file]): ``{"preset": base, "hardware": {...}, "machine":
        {...}}``; ``machine`` holds the raw fits, the load average and the date.
    """
    from cp_dtensor.launch import run_distributed
    from cp_dtensor.tools.bench.machine import machine_facts

    spec = spec or ProbeSpec()
    facts = machine_facts()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "probe.json")
        run_distributed(_probe_rank, spec.ranks, spec, out, threads_per_rank=1, timeout_s=timeout_s)
        per_rank = json.loads(Path(out).read_text())
    fitted = hardware_from_probe(spec, per_rank)
    build_hardware(spec.base, fitted["hardware"])  # validates the fields
    facts["load_average_at_end"] = os.getloadavg()
    facts["calibration_seconds"] = time.perf_counter() - t0
    return {
        "preset": spec.base,
        "hardware": fitted["hardware"],
        "machine": {**facts, "spec": asdict(spec), "fits": fitted["fits"]},
    }
