"""The ``--device cuda`` path: on one GPU, the simulated CP ring against one monolithic SDPA call.

:func:`cp_dtensor.simulate_context_parallel_attention` runs the ring schedule of every rank in one process,
with each CUDA backend (flash, cudnn, efficient), against one SDPA call of that backend on the full
sequence: time, max abs difference, bytes vs the minimum, work balance. Run by ``scripts/check_cuda.sh`` on a
GPU machine; CI has no GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cp_dtensor
from cp_dtensor.tools.bench.config import BenchConfig, dtype_from_name
from cp_dtensor.tools.bench.report import markdown_table
from cp_dtensor.tools.bench.theory import min_bytes_per_rank
from cp_dtensor.tools.bench.timing import summarize

__all__ = ["CUDA_BACKENDS", "run_cuda"]

CUDA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def run_cuda(cfg: BenchConfig, backends: Sequence[str], header: dict[str, Any]) -> dict[str, Any]:
    """One GPU: simulated CP ring (every rank in one process) vs one monolithic SDPA, per CUDA backend.

    Prints a markdown table (one row per sequence length and backend).

    Args:
        cfg: shapes, sweep, CP degree, dtype, mask, repeats, warmup and seed (variants, overlap and
            profile are not used).
        backends: keys of :data:`CUDA_BACKENDS`.
        header: ``command`` and ``machine`` of the report.

    Returns:
        The report: ``header`` plus ``device``, ``gpu`` and ``cuda_results``.

    Raises:
        SystemExit: no CUDA device is available.
    """
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False).")
    dtype = dtype_from_name(cfg.dtype)
    dev = torch.device("cuda")
    scale = cfg.scale
    results = []
    for seq_len in cfg.seq_lens:
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        shape_q = (cfg.batch, cfg.heads, seq_len, cfg.head_dim)
        shape_kv = (cfg.batch, cfg.kv_heads, seq_len, cfg.head_dim)
        q, dout = (torch.randn(shape_q, generator=gen, device=dev, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(shape_kv, generator=gen, device=dev, dtype=dtype) for _ in range(2))
        for backend in backends:
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
                n_rep = cfg.heads // cfg.kv_heads
                k_full, v_full = (t.repeat_interleave(n_rep, dim=1) for t in (kk, vv))
                with sdpa_kernel(CUDA_BACKENDS[backend]):
                    o = F.scaled_dot_product_attention(qq, k_full, v_full, is_causal=cfg.causal, scale=scale)
                o.backward(inputs[3])
                return {"out": o.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad}

            def sim(backend: str = backend, inputs: tuple[torch.Tensor, ...] = inputs) -> Any:
                return cp_dtensor.simulate_context_parallel_attention(
                    *inputs[:3],
                    cfg.cp,
                    grad_out=inputs[3],
                    is_causal=cfg.causal,
                    scale=scale,
                    layout="zigzag",
                    comm="p2p",
                    backend=backend,
                )

            def cuda_time(fn: Callable[[], Any]) -> tuple[list[float], Any]:
                times, res = [], None
                for i in range(cfg.warmup + cfg.repeats):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    res = fn()
                    torch.cuda.synchronize()
                    if i >= cfg.warmup:
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
                batch=cfg.batch,
                kv_heads=cfg.kv_heads,
                seq_len=seq_len,
                head_dim=cfg.head_dim,
                cp=cfg.cp,
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
                f"simulated CP={cfg.cp} ring s",
                "ring/mono",
                "max|diff|",
                "bytes/min f/b",
            ],
            rows,
        )
    )
    return {**header, "device": "cuda", "gpu": torch.cuda.get_device_name(), "cuda_results": results}
