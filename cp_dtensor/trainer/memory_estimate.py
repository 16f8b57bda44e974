"""The activation-memory estimate of one training step per rank, and the check that refuses or warns
before any process starts when it does not fit."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cp_dtensor.config import JobConfig
from cp_dtensor.models.llama import ModelArgs
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

    The planner's formula (Note [Cost model] in ``cp_dtensor/tools/planner/step_estimate.py``) for this
    code (``CostOptions.cp_dtensor()``: DTensor TP saves its gathered inputs, fp32 norms, full-vocab fp32
    log-softmax on every tp rank), written out here because training does not import the planner::

        T     = local_batch_size x seq_len / cp          tokens of this rank's CP shard (one accumulation
                                                         step; TP splits widths, sequence parallel the rest)
        B     = 2 with bf16 parameters, else 4            bytes per activation element
        norm  = (8 + (B if B < 4 else 0)) x dim + 4      fp32 input, normalized output (+ cast), 1/rms
        block = 2 norm / tp + 2 B dim                    per token per layer: norms, gathered linear inputs
                + (B (2 dim + 2 kv_dim + 4 ffn) + 4 n_heads) / tp      q, k, v, attention out, lse, SwiGLU
        keep  = (L - R) block + R B dim / tp + in        L layers of this pp rank, R of them recomputed
                (ac "none": R = 0; "full": R = L; "selective": R = ceil(L / N)): a recomputed block keeps only
                its input; in = 8 + 4 head_dim (token ids, RoPE table)
        work  = block if R > 0 else 0                    backward rebuilds one recomputed block at a time
        head  = norm / tp + B dim + 4 vocab_size          final norm, gathered head input, fp32 log-softmax
        bytes = T x (keep + head + work)                 (no PP)
              = max(T f keep, T / M (keep + head)) + T / M work
                                                         (PP, M microbatches: the first stage holds
                                                         f = min(pp, M) / M of the batch, f = 1 under GPipe)

    Weights, gradients, optimizer state, temporaries and communication buffers are not counted, so the
    real need is larger. Measured on CPU (debug_cpu.toml: debug flavor, cp 2, fp32, local_batch_size 8,
    2 steps): seq_len 1024 estimates 0.05 GiB per rank and peaks at 0.41 GiB RSS; seq_len 16384 estimates
    0.84 GiB and peaks at 1.77 GiB: the estimate grew by 0.78 GiB, the RSS by 1.36 GiB (1.7x).
    """
    t, par = cfg.training, cfg.parallelism
    b = 2 if t.mixed_precision_param == "bfloat16" else 4
    dim, tp, kv_dim = args.dim, pd.tp, args.kv_heads * args.head_dim
    norm = (8 + (b if b < 4 else 0)) * dim + 4
    block = (
        2 * norm / tp
        + 2 * b * dim
        + (b * (2 * dim + 2 * kv_dim + 4 * args.ffn_hidden_dim) + 4 * args.n_heads) / tp
    )
    layers = math.ceil(args.n_layers / pd.pp)
    recomputed = 0
    if cfg.activation_checkpoint.mode == "full":
        recomputed = layers
    elif cfg.activation_checkpoint.mode == "selective":
        recomputed = math.ceil(layers / int(cfg.activation_checkpoint.selective_ac_option))
    keep = (layers - recomputed) * block + recomputed * b * dim / tp + 8 + 4 * args.head_dim
    work = block if recomputed else 0.0
    head = norm / tp + b * dim + 4 * args.vocab_size
    tokens = t.local_batch_size * t.seq_len / pd.cp
    if pd.pp == 1:
        return tokens * (keep + head + work)
    m = par.pipeline_parallel_microbatches if par.pipeline_parallel_microbatches > 0 else pd.pp
    in_flight = m if par.pipeline_parallel_schedule == "GPipe" else min(pd.pp, m)
    return max(tokens * in_flight / m * keep, tokens / m * (keep + head)) + tokens / m * work


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
