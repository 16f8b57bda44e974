"""The activation-memory estimate of one training step per rank, and the check that refuses or warns
before any process starts when it does not fit."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cp_dtensor.config import JobConfig
from cp_dtensor.cost.memory import BlockShape, MemoryFormat, recomputed_layers
from cp_dtensor.cost.memory import activation_bytes_per_rank as activation_bytes_per_rank_of
from cp_dtensor.models.args import ModelArgs
from cp_dtensor.parallel_dims import ParallelDims

__all__ = [
    "ACTIVATION_WARN_FRACTION",
    "GIB",
    "MemoryBudget",
    "activation_bytes_per_rank",
    "local_memory_budget",
]


GIB = 2**30
ACTIVATION_WARN_FRACTION = 0.5
"""Warn (not refuse) when the activation estimate alone takes more than this share of a rank's memory:
weights, gradients, optimizer state and temporaries come on top of it."""


@dataclass(frozen=True)
class MemoryBudget:
    """Memory one rank may fill, and where the number comes from (for messages).

    Attributes:
        bytes_per_rank: bytes available to one rank.
        source: what the number is, e.g. "22.9 GiB of RAM shared by 2 local ranks".
        shared: the ranks of this machine share the memory (CPU RAM), so more CP ranks on it do not help.
    """

    bytes_per_rank: float
    source: str
    shared: bool = False


def local_memory_budget(world_size: int) -> MemoryBudget:
    """This machine's memory per rank: with CUDA the total memory of this rank's GPU (one GPU per rank),
    else the physical RAM shared by this machine's ranks (``LOCAL_WORLD_SIZE`` under a launcher, all
    ``world_size`` ranks when they are spawned here)."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return MemoryBudget(
            props.total_memory, f"GPU {index} ({props.name}, {props.total_memory / GIB:.1f} GiB)"
        )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return MemoryBudget(
        ram / ranks, f"{ram / GIB:.1f} GiB of RAM shared by {ranks} local rank(s)", shared=True
    )


def activation_bytes_per_rank(cfg: JobConfig, pd: ParallelDims, args: ModelArgs) -> float:
    """Bytes one rank keeps for backward at the peak of one step: a floor of what the step needs.

    The library's formula (Note [Activation memory] in ``cp_dtensor.cost.memory``, the one the planner
    uses too) for this code: DTensor TP saves its gathered inputs, fp32 norms, full-vocab fp32
    log-softmax on every tp rank; ``T = local_batch_size x seq_len / cp`` tokens per accumulation step.

    Weights, gradients, optimizer state, temporaries and communication buffers are not counted, so the
    real need is larger. Measured on CPU (debug_cpu.toml: debug flavor, cp 2, fp32, local_batch_size 8,
    2 steps): seq_len 1024 estimates 0.05 GiB per rank and peaks at 0.41 GiB RSS; seq_len 16384 estimates
    0.84 GiB and peaks at 1.77 GiB: the estimate grew by 0.78 GiB, the RSS by 1.36 GiB (1.7x).
    """
    t, par = cfg.training, cfg.parallelism
    shape = BlockShape(
        dim=args.dim, kv_dim=args.kv_heads * args.head_dim, n_heads=args.n_heads, head_dim=args.head_dim,
        ffn_hidden=args.ffn_hidden_dim, vocab_size=args.vocab_size, q_dim=args.n_heads * args.head_dim,
    )  # fmt: skip
    fmt = MemoryFormat(
        dtype_bytes=2 if t.mixed_precision_param == "bfloat16" else 4,
        saves_gathered_input=True,
        fused_norm=False,
        loss_parallel=False,
    )
    layers = math.ceil(args.n_layers / pd.pp)
    ac = cfg.activation_checkpoint
    recomputed = recomputed_layers(
        layers, ac.mode, int(ac.selective_ac_option) if ac.mode == "selective" else 2
    )
    m = par.pipeline_parallel_microbatches if par.pipeline_parallel_microbatches > 0 else pd.pp
    return activation_bytes_per_rank_of(
        shape, fmt, tokens=t.local_batch_size * t.seq_len / pd.cp, layers=layers, recomputed=recomputed,
        tp=pd.tp, pp=pd.pp, microbatches=m,
        in_flight=m if par.pipeline_parallel_schedule == "GPipe" else min(pd.pp, m),
    )  # fmt: skip


def _check_memory(
    cfg: JobConfig,
    pd: ParallelDims,
    args: ModelArgs,
    memory: MemoryBudget,
    warn: Callable[[str], None] | None,
) -> None:
    """Refuse a job whose activations alone exceed a rank's memory; warn when they take most of it."""
    need = activation_bytes_per_rank(cfg, pd, args)
    if need <= ACTIVATION_WARN_FRACTION * memory.bytes_per_rank:
        return
    t = cfg.training
    what = (
        f"one step keeps ~{need / GIB:.1f} GiB of activations per rank (local_batch_size "
        f"{t.local_batch_size} x seq_len {t.seq_len} / context_parallel_degree {pd.cp}, flavor "
        f"{cfg.model.flavor!r}, activation_checkpoint.mode {cfg.activation_checkpoint.mode!r})"
    )
    fixes = [] if memory.shared else ["raise parallelism.context_parallel_degree (more devices)"]
    if cfg.activation_checkpoint.mode != "full":
        fixes.append('set activation_checkpoint.mode = "full"')
    fixes.append("lower training.local_batch_size" if t.local_batch_size > 1 else "lower training.seq_len")
    fix = ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]
    if need > memory.bytes_per_rank:
        raise ValueError(
            f"{what}, more than the {memory.bytes_per_rank / GIB:.1f} GiB a rank has ({memory.source}); {fix}."
        )
    if warn is not None:
        warn(
            f"{what}: {need / memory.bytes_per_rank:.0%} of the {memory.bytes_per_rank / GIB:.1f} GiB a rank has "
            f"({memory.source}), before weights and optimizer state; if it runs out of memory, {fix}."
        )
