"""One rank's inputs and step functions for one sequence length (runs inside a spawned rank).

:class:`RankBench` holds the full inputs (the same on every rank: same seed), this rank's shards of them in
each layout, and the variants of the run; :meth:`RankBench.make_step` gives a forward + backward closure
per variant. The measurements (:mod:`.verify`, :mod:`.time_rounds`, :mod:`.overlap`, :mod:`.profiling`)
take a :class:`RankBench`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention import SDPBackend, sdpa_kernel

import cp_dtensor
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.layout import shard_sequence_for_rank
from cp_dtensor.tools.bench.config import BenchConfig, dtype_from_name
from cp_dtensor.tools.bench.torch_ring import CPU_FLASH_BWD, CPU_FLASH_FWD, TorchRingAttention, TorchRingSpec
from cp_dtensor.tools.bench.variants import Variant, build_variants

__all__ = ["RankBench"]


class RankBench:
    """Inputs, step functions and the run's variants of one rank for one sequence length.

    Attributes:
        cfg: the run's configuration.
        seq_len: global sequence length S.
        mesh: 1-D CP mesh.
        group: its process group.
        rank: this rank in ``group``.
        cp: size of ``group``.
        dtype: input dtype.
        full: full inputs q, k, v, dout, each (B, H, S, D) (Hkv heads for k, v).
        local: per layout, this rank's shards of ``full``, each (B, H, S_local, D).
        variants: the variants of this run, in table order.
    """

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

    def variant(self, name: str) -> Variant:
        """The variant of this run called ``name``."""
        return next(v for v in self.variants if v.name == name)

    def leaves(self, variant: Variant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh q, k, v leaves requiring grad (full for SDPA, this rank's shards otherwise) and dout."""
        src = self.full if variant.kind == "sdpa" else self.local[variant.layout]
        q, k, v = (src[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v"))
        return q, k, v, src["dout"]

    def torch_spec(
        self,
        variant: Variant,
        fwd_op: Callable[..., Any] = CPU_FLASH_FWD,
        bwd_op: Callable[..., Any] = CPU_FLASH_BWD,
    ) -> TorchRingSpec:
        """How to call PyTorch's ring loop for ``variant`` (load balancing iff causal)."""
        return TorchRingSpec(
            self.group, self.cfg.causal, self.cfg.scale, variant.comm, self.cfg.causal, fwd_op, bwd_op
        )

    def forward(
        self,
        variant: Variant,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        stats: AttentionStats | None = None,
        spec: TorchRingSpec | None = None,
    ) -> torch.Tensor:
        """The forward of ``variant`` (autograd records it).

        Args:
            variant: what to run.
            q: (B, Hq, S_or_S_local, D) queries.
            k: (B, Hkv, S_or_S_local, D) keys.
            v: (B, Hkv, S_or_S_local, D) values.
            stats: filled by cp_dtensor variants.
            spec: how to call PyTorch's loop (default :meth:`torch_spec`).

        Returns:
            (B, Hq, S_or_S_local, D) attention output.
        """
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
                stats=stats,
            )
        if variant.kind == "torch":
            return TorchRingAttention.apply(q, k, v, spec or self.torch_spec(variant))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=cfg.causal, scale=cfg.scale, enable_gqa=cfg.heads != cfg.kv_heads
            )

    def make_step(self, variant: Variant) -> Callable[[], None]:
        """A closure running one forward + backward of ``variant`` on fresh-gradient leaves."""
        q, k, v, dout = self.leaves(variant)
        spec = self.torch_spec(variant) if variant.kind == "torch" else None

        def step() -> None:
            q.grad = k.grad = v.grad = None
            out = self.forward(variant, q, k, v, spec=spec)
            out.backward(dout)

        return step

    def runs_here(self, variant: Variant) -> bool:
        """CP variants run on every rank; single-process SDPA only on rank 0."""
        return variant.kind != "sdpa" or self.rank == 0

    @contextlib.contextmanager
    def threads(self, variant: Variant) -> Iterator[None]:
        """Give rank 0 the single-process variant's threads for the block; one thread afterwards."""
        if variant.kind == "sdpa" and self.rank == 0:
            torch.set_num_threads(variant.threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)
