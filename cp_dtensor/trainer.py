"""The training loop: config -> mesh -> parallelized model -> data -> steps -> metrics -> checkpoints.

Runs on every rank with the default process group initialized (``cp_dtensor.launch`` does that for
``train.py``, under torchrun or by spawning local CPU processes).

Note [Trainer step]
~~~~~~~~~~~~~~~~~~~
::

    global batch k (same on every rank; depends only on seed and k)
      -> shard_batch: DTensors on ("dp", "cp", "tp"): rows of this dp rank, sequence shards of this cp
         rank (layout order, positions follow; Note [Layout-ordered DTensors])
      -> train_step: accumulation chunks of local_batch_size rows (PP: pipeline microbatches)
         loss = sum CE / global token count; FSDP sums grads over dp x cp; clip; AdamW; LR schedule
      -> metrics (rank 0) -> checkpoint every `interval` steps and at the end
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cp_dtensor.attention.alltoall import heads_split
from cp_dtensor.attention.choice import CommChoice, choose_comm, hardware_for_device
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.balance import BalancedLayoutRule, layout_work, to_sequence_layout
from cp_dtensor.checkpoint import (
    CheckpointManager,
    ModelState,
    ObjectState,
    OptimizerState,
    model_fingerprint,
)
from cp_dtensor.config import JobConfig
from cp_dtensor.data import (
    RECALL_CUE_START_FRACTION,
    GlobalBatchLoader,
    SyntheticRecallDataset,
    TextDataset,
    load_tokenizer,
    validate_token_ids,
)
from cp_dtensor.layout import LayoutLike, sequence_positions
from cp_dtensor.metrics import MetricsLogger, StepMetrics, gpu_peak_tflops, peak_memory_bytes
from cp_dtensor.models.llama import LLAMA3_FLAVORS, ModelArgs, Transformer, model_flops_per_token
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.parallelize import ParallelModel, build_parallel_model
from cp_dtensor.pipeline import stages_per_rank
from cp_dtensor.sharding import shard_batch
from cp_dtensor.train_step import StepResult, train_step

__all__ = [
    "MemoryBudget",
    "Trainer",
    "activation_bytes_per_rank",
    "build_lr_lambda",
    "build_model",
    "local_memory_budget",
    "model_args_for",
    "validate_job",
]

GIB = 2**30
ACTIVATION_WARN_FRACTION = 0.5
"""Warn (not refuse) when the activation estimate alone takes more than this share of a rank's memory:
weights, gradients, optimizer state and temporaries come on top of it."""


def build_lr_lambda(steps: int, warmup: int, schedule: str, min_ratio: float):
    """LR multiplier per optimizer step: linear warmup to 1, then cosine/linear decay to ``min_ratio``."""

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def validate_job(
    cfg: JobConfig,
    world_size: int,
    *,
    memory: MemoryBudget | None = None,
    warn: Callable[[str], None] | None = None,
) -> ParallelDims:
    """All checks that need the world size and the model shape, before any collective.

    Args:
        cfg: the job config.
        world_size: number of ranks the job runs on.
        memory: memory one rank may fill; None measures this machine (:func:`local_memory_budget`).
        warn: receives a one-line warning when the activation estimate takes more than
            ``ACTIVATION_WARN_FRACTION`` of ``memory`` (None: no warning).

    Raises:
        ValueError: naming the value and the fix (degrees vs world size, seq_len multiple, seq_len above the
            flavor's max_seq_len, heads vs tp, pp vs layers, batch vs dp and microbatches, unknown flavor,
            activations of one step larger than a rank's memory).
    """
    par = cfg.parallelism
    pd = ParallelDims(
        dp=par.data_parallel_degree,
        pp=par.pipeline_parallel_degree,
        cp=par.context_parallel_degree,
        tp=par.tensor_parallel_degree,
        world_size=world_size,
        cp_layout=cfg.cp_layout,
    )
    pd.validate_seq_len(cfg.training.seq_len)
    args = model_args_for(cfg)
    if cfg.training.seq_len > args.max_seq_len:
        raise ValueError(
            f"training.seq_len {cfg.training.seq_len} exceeds max_seq_len {args.max_seq_len} of model flavor "
            f"{cfg.model.flavor!r}; use --training.seq_len {args.max_seq_len} or less."
        )
    kv_heads = args.n_kv_heads or args.n_heads
    if args.n_heads % kv_heads:
        raise ValueError(
            f"model flavor {cfg.model.flavor!r}: n_heads {args.n_heads} is not a multiple of n_kv_heads {kv_heads}."
        )
    if args.n_heads % pd.tp or kv_heads % pd.tp:
        raise ValueError(
            f"parallelism.tensor_parallel_degree {pd.tp} must divide n_heads {args.n_heads} and n_kv_heads "
            f"{kv_heads} of flavor {cfg.model.flavor!r}."
        )
    comm, a2a = par.context_parallel_comm, par.context_parallel_a2a_degree
    if pd.cp_enabled and (comm == "alltoall" or (comm == "hybrid" and a2a)):
        size = pd.cp if comm == "alltoall" else a2a
        heads, kv = args.n_heads // pd.tp, kv_heads // pd.tp
        if not heads_split(heads, kv, size):
            raise ValueError(
                f'parallelism.context_parallel_comm "{comm}" shares heads over {size} ranks, but flavor '
                f"{cfg.model.flavor!r} has {heads} query / {kv} KV heads per tp rank (n_heads {args.n_heads}, "
                f"n_kv_heads {kv_heads}, tp {pd.tp}): the query heads must divide by {size} and the KV heads "
                f'divide it or divide by it; use comm "p2p", "auto", or another degree.'
            )
    priced = comm == "auto" or (comm == "hybrid" and not a2a)
    if pd.cp_enabled and priced and par.context_parallel_cost_hardware != "auto":
        hardware_for_device("cpu", par.context_parallel_cost_hardware)  # an unknown preset / file: one line
    stages = pd.pp * stages_per_rank(par.pipeline_parallel_schedule)
    if stages > args.n_layers:
        raise ValueError(
            f"parallelism.pipeline_parallel_degree {pd.pp} needs {stages} stages but flavor "
            f"{cfg.model.flavor!r} has only {args.n_layers} layers."
        )
    if cfg.compile.enable and pd.tp_enabled:
        raise ValueError(
            "compile.enable with tensor_parallel_degree > 1 is not supported yet: with this torch, compiled "
            "TP blocks lose the gradient of their plain-tensor input (tp 2 x cp 2: the token embedding gets a "
            "zero gradient) or fail in backward (tp 2, cp 1: DTensor's Redistribute.backward receives a plain "
            "tensor), so the trainer refuses rather than train wrongly; set compile.enable = false or "
            "tensor_parallel_degree = 1."
        )
    if cfg.compile.enable and cfg.compile.backend == "inductor" and not _has_cxx_compiler():
        raise ValueError(
            "compile.enable with the inductor backend needs a C++ compiler on CPU and none was found (g++, "
            'or $CXX); install one (e.g. apt-get install g++), or set compile.backend = "aot_eager" or '
            "compile.enable = false."
        )
    backend = par.context_parallel_backend
    if pd.cp_enabled and backend in ("flash", "cudnn", "efficient") and not torch.cuda.is_available():
        raise ValueError(
            f'parallelism.context_parallel_backend "{backend}" needs a CUDA GPU and none is visible; use "auto" '
            f'or "cpu_flash".'
        )
    if pd.cp_enabled and backend == "cpu_flash" and torch.cuda.is_available():
        raise ValueError(
            'parallelism.context_parallel_backend "cpu_flash" runs on CPU tensors but training runs on the GPU; '
            'use "auto", "flash", "cudnn" or "efficient".'
        )
    if cfg.data.dataset == "text":
        for path in map(Path, cfg.data.paths):
            if not path.exists():
                raise FileNotFoundError(f"data.paths: {path} does not exist.")
            if path.is_file() and path.stat().st_size == 0:
                raise ValueError(f"data.paths: {path} is empty.")
    gbs = _global_batch_size(cfg, pd)
    local_rows = gbs // pd.dp
    if gbs % pd.dp or local_rows % cfg.training.local_batch_size:
        raise ValueError(
            f"training.global_batch_size {gbs} must be a multiple of data_parallel_degree {pd.dp} x "
            f"local_batch_size {cfg.training.local_batch_size}."
        )
    _check_memory(cfg, pd, args, memory or local_memory_budget(world_size), warn)
    return pd


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


def _has_cxx_compiler() -> bool:
    """Inductor generates C++ for CPU: a compiler must be on PATH (or named by $CXX). GPUs do not need one."""
    import shutil

    if torch.cuda.is_available():
        return True
    cxx = os.environ.get("CXX")
    return bool(
        (cxx and shutil.which(cxx)) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    )


def _torchtitan_integration() -> Any:
    try:
        from cp_dtensor.integrations import torchtitan
    except ImportError as e:
        raise ValueError(
            f'model.name "torchtitan.llama3" needs the torchtitan extra: pip install "cp_dtensor[torchtitan]" '
            f"(torchtitan>=0.2.2,<0.3); {e}"
        ) from None
    return torchtitan


def model_args_for(cfg: JobConfig) -> ModelArgs:
    """Shape of the model that ``cfg.model`` names (``name``, ``flavor``, ``attention_mask``).

    Raises:
        ValueError: unknown flavor; for "torchtitan.llama3" also a missing extra or a bidirectional mask.
    """
    causal = cfg.model.attention_mask != "bidirectional"
    if cfg.model.name == "torchtitan.llama3":
        if cfg.model.attention_mask == "document_causal" or cfg.model.sliding_window:
            raise ValueError(
                'model.name "torchtitan.llama3" serves "causal" attention here; for packed documents use '
                'model.name "llama3", or torchtitan\'s own block_causal mask through '
                "python -m cp_dtensor.integrations.torchtitan."
            )
        return _torchtitan_integration().torchtitan_llama3_args(
            cfg.model.flavor, seq_len=cfg.training.seq_len, causal=causal
        )
    if cfg.model.flavor not in LLAMA3_FLAVORS:
        raise ValueError(
            f"model.flavor {cfg.model.flavor!r} is unknown; choose one of {sorted(LLAMA3_FLAVORS)}."
        )
    return replace(
        LLAMA3_FLAVORS[cfg.model.flavor],
        causal=causal,
        sliding_window=cfg.model.sliding_window,
        sliding_window_layers=cfg.model.sliding_window_layers,
    )


def build_model(cfg: JobConfig) -> nn.Module:
    """The model that ``cfg.model`` names, on the current default device: cp_dtensor's Llama ("llama3") or
    torchtitan's Llama 3 behind cp_dtensor's model interface ("torchtitan.llama3")."""
    args = model_args_for(cfg)
    if cfg.model.name == "torchtitan.llama3":
        return _torchtitan_integration().build_torchtitan_llama3(
            cfg.model.flavor, seq_len=cfg.training.seq_len, causal=args.causal
        )
    return Transformer(args)


def job_comm_choice(cfg: JobConfig, pd: ParallelDims, args: ModelArgs, device: torch.device) -> CommChoice:
    """The CP strategy of this job: ``parallelism.context_parallel_comm`` as named, or for ``"auto"`` (and
    ``"hybrid"`` without an a2a degree) the cost model's choice for one attention call of this job."""
    par, t = cfg.parallelism, cfg.training
    kv_heads = args.n_kv_heads or args.n_heads
    microbatches = par.pipeline_parallel_microbatches if par.pipeline_parallel_microbatches > 0 else pd.pp
    rows = t.local_batch_size // (microbatches if pd.pp_enabled else 1)
    return choose_comm(
        par.context_parallel_comm,
        heads=args.n_heads // pd.tp,
        kv_heads=max(1, kv_heads // pd.tp),
        head_dim=args.dim // args.n_heads,
        seq_len=t.seq_len,
        cp=pd.cp,
        tp=pd.tp,
        micro_batch=max(1, rows),
        dtype=torch.bfloat16 if t.mixed_precision_param == "bfloat16" else torch.float32,
        causal=cfg.model.attention_mask != "bidirectional",
        device=device,
        hardware=par.context_parallel_cost_hardware,
        a2a_size=par.context_parallel_a2a_degree or None,
    )


def _global_batch_size(cfg: JobConfig, pd: ParallelDims) -> int:
    gbs = cfg.training.global_batch_size
    return cfg.training.local_batch_size * pd.dp if gbs == -1 else gbs


@dataclass
class _Data:
    loader: GlobalBatchLoader
    chance_loss: float | None
    summary: str = ""  # what the data is, for the log


def _recall_ranks(dataset: SyntheticRecallDataset, cp: int, layout: str) -> tuple[list[int], list[int]]:
    """CP ranks that hold the cue region and the query positions of ``dataset`` (per the layout's code).

    Note [Recall across CP ranks]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    The queries sit at the end of the sequence. The rank holding the last position holds, for cp >= 2::

        zigzag      [0, S/(2cp))  and  [S - S/(2cp), S)       S/(2cp) <= S/4
        contiguous                     [S - S/cp, S)          S/cp   <= S/2

    so a cue region inside [S/4, S/2) lies on another rank for every cp and both layouts (cp 2 zigzag:
    chunk 1 of 4, rank 1; queries in chunk 3, rank 0). One fixed place keeps the samples independent of
    the parallel degrees: a run resumed under other degrees, or compared with cp = 1, sees the same data.
    """
    owner = torch.empty(dataset.seq_len, dtype=torch.int64)  # (S,) CP rank of each position
    for rank in range(cp):
        owner[sequence_positions(dataset.seq_len, rank, cp, layout)] = rank
    cue = owner[dataset.cue_start : dataset.cue_end].unique().tolist()
    queries = owner[dataset.seq_len - dataset.num_queries - 1 :].unique().tolist()  # marker and queries
    return cue, queries


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _build_data(cfg: JobConfig, vocab_size: int, global_batch_size: int) -> _Data:
    """The job's data: packed text documents (``data.tokenizer``) or the synthetic recall task.

    Raises:
        ValueError: ``data.recall_documents = "split"`` without the document_causal mask,
            a tokenizer whose ids exceed the model's vocab_size, a missing ``tokenizers`` library, or what
            :class:`TextDataset` raises for the files.
        FileNotFoundError: No tokenizer.json at ``data.tokenizer``, or a missing data file.
    """
    t, par, data = cfg.training, cfg.parallelism, cfg.data
    cp = par.context_parallel_degree
    document_mask = cfg.model.attention_mask == "document_causal"
    if data.dataset == "text":
        try:
            tokenizer = load_tokenizer(data.tokenizer)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data.tokenizer: {e}") from None
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"data.tokenizer {data.tokenizer!r} uses token ids up to {tokenizer.vocab_size - 1} but flavor "
                f"{cfg.model.flavor!r} has vocab_size {vocab_size}; use a flavor with vocab_size >= "
                f"{tokenizer.vocab_size} or a smaller tokenizer."
            )
        dataset = TextDataset(
            data.paths,
            t.seq_len,
            text_field=data.jsonl_field,
            tokenizer=tokenizer,
            reset_positions=data.reset_positions,
        )
        summary = (
            f"text, {dataset.num_documents} documents, {dataset.num_tokens} tokens ({tokenizer.name} tokenizer, "
            f"BOS {tokenizer.BOS}, EOS {tokenizer.EOS}), {len(dataset)} samples of {t.seq_len} tokens, "
            f"{'per-document' if data.reset_positions else 'global'} positions"
        )
        return _Data(GlobalBatchLoader(dataset, global_batch_size, seed=t.seed), None, summary)
    if data.recall_documents == "split" and not document_mask:
        raise ValueError(
            f'data.recall_documents "split" puts the cue and the queries in different documents, but '
            f"model.attention_mask {cfg.model.attention_mask!r} ignores documents (the queries would still see "
            f'their cue); use model.attention_mask "document_causal", or data.recall_documents "same".'
        )
    # Keep the cue density of the default (4 copies per 256 tokens) at any length, so that the task's
    # difficulty comes from the distance between cue and query, not from a vanishing cue.
    recall = SyntheticRecallDataset(
        t.seq_len,
        vocab_size,
        seed=t.seed,
        cue_repeats=max(4, t.seq_len // 64),
        cue_start_fraction=RECALL_CUE_START_FRACTION,
        documents=data.recall_documents,
        reset_positions=data.reset_positions,
    )
    query_start = t.seq_len - recall.num_queries
    summary = (
        f"synthetic long-range recall, chance loss {recall.chance_loss:.4f} (answers sit "
        f"{query_start - recall.cue_end + 1}-{t.seq_len - 1 - recall.cue_start} tokens after their cue"
    )
    if recall.split_position is not None:
        summary += (
            f"; cue and queries in two documents split at position {recall.split_position}: the queries cannot "
            f"see their cue, the loss should stay near chance"
        )
    # With two documents the balanced layout is no longer zigzag; the split task needs no crossing anyway.
    if cp > 1 and not (recall.split_position is not None and cfg.cp_layout == "balanced"):
        layout = cfg.cp_layout if cfg.cp_layout != "balanced" else "zigzag"  # one document: balanced = zigzag
        cue_ranks, query_ranks = _recall_ranks(recall, cp, layout)
        if set(cue_ranks) & set(query_ranks):
            raise ValueError(
                f"the synthetic recall task would not cross CP ranks: with layout "
                f"{cfg.cp_layout!r} and context_parallel_degree {cp}, ranks {cue_ranks} hold its "
                f"cue and ranks {query_ranks} its queries; see Note [Recall across CP ranks] in trainer.py."
            )
        summary += f"; cue on CP {_ranks(cue_ranks)}, queries on CP {_ranks(query_ranks)}"
    return _Data(GlobalBatchLoader(recall, global_batch_size, seed=t.seed), recall.chance_loss, summary + ")")


class Trainer:
    """A torchtitan-style trainer for the Llama model with CP, TP, FSDP2, PP and AC from a :class:`JobConfig`.

    Args:
        cfg: the validated job config.
    """

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.parallel_dims = validate_job(cfg, world)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        t = cfg.training
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.parallel_dims.build_mesh(self.device.type)
        dump = Path(cfg.job.dump_folder)
        self.metrics = MetricsLogger(
            is_rank0=self.rank == 0,
            total_steps=t.steps,
            log_freq=cfg.metrics.log_freq,
            log_file=dump / cfg.metrics.log_file,
            tensorboard_dir=dump / cfg.metrics.save_tb_folder if cfg.metrics.enable_tensorboard else None,
        )
        self.ring_stats = AttentionStats() if self.parallel_dims.cp_enabled else None
        self.use_documents = cfg.model.attention_mask == "document_causal"
        # A layout name, or for "balanced" the rule that plans each batch (shard_batch and the CP style).
        self.cp_layout: Any = cfg.cp_layout
        if cfg.cp_layout == "balanced":
            window = (
                (cfg.model.sliding_window - 1, 0)
                if cfg.model.sliding_window_layers == "all" and cfg.model.sliding_window
                else (-1, -1)
            )
            self.cp_layout = BalancedLayoutRule(
                is_causal=cfg.model.attention_mask != "bidirectional", window_size=window
            )
        self.model_args, self.parallel_model = self._build_model()
        self.optimizers = [
            torch.optim.AdamW(
                part.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay, eps=1e-8
            )
            for part in self.parallel_model.model_parts
        ]
        lr_lambda = build_lr_lambda(t.steps, t.warmup_steps, t.lr_schedule, t.min_lr_ratio)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in self.optimizers]
        self.data = _build_data(cfg, self.model_args.vocab_size, _global_batch_size(cfg, self.parallel_dims))
        self.step = 0
        self.checkpoints = (
            CheckpointManager(
                dump / cfg.checkpoint.folder,
                keep_latest_k=cfg.checkpoint.keep_latest_k,
                log=self.metrics.info,
            )
            if cfg.checkpoint.enable
            else None
        )
        gbs = self.data.loader.global_batch_size
        self.accumulation_steps = gbs // self.parallel_dims.dp // t.local_batch_size
        self.flops_per_token = model_flops_per_token(self.model_args, t.seq_len)
        peak = gpu_peak_tflops()
        self.peak_flops = peak * 1e12 if peak else None

    # ---- construction ------------------------------------------------------------------------------
    def _build_model(self) -> tuple[Any, ParallelModel]:
        cfg, pd = self.cfg, self.parallel_dims
        with torch.device("meta"):
            model = build_model(cfg)
        self.model_fingerprint = model_fingerprint(
            model,
            f"{cfg.model.name}/{cfg.model.flavor}",
            {"model.name": cfg.model.name, "model.flavor": cfg.model.flavor},
        )  # the whole model's parameter shapes, before PP splits it
        param_dtype = torch.bfloat16 if cfg.training.mixed_precision_param == "bfloat16" else None
        comm = job_comm_choice(cfg, pd, model.args, self.device) if pd.cp_enabled else CommChoice("p2p", None)
        self.cp_comm = comm
        pm = build_parallel_model(
            model,
            pd,
            device=self.device,
            pp_schedule=cfg.parallelism.pipeline_parallel_schedule,
            pp_microbatches=cfg.parallelism.pipeline_parallel_microbatches,
            ac_mode=cfg.activation_checkpoint.mode,
            selective_ac_every=int(cfg.activation_checkpoint.selective_ac_option),
            cp_settings=CPSettings(
                layout=self.cp_layout,
                comm=comm.comm,
                a2a_size=comm.a2a_size,
                backend=None
                if cfg.parallelism.context_parallel_backend == "auto"
                else cfg.parallelism.context_parallel_backend,
                cost_hardware=cfg.parallelism.context_parallel_cost_hardware,
                stats=self.ring_stats,
            ),
            compile_backend=cfg.compile.backend if cfg.compile.enable else None,
            param_dtype=param_dtype,
        )
        for part in pm.model_parts:
            part.to_empty(device=self.device)
            part.init_weights(seed=cfg.training.seed)
        n_params = sum(p.numel() for p in model.parameters())
        self.metrics.info(
            f"model {cfg.model.name}/{cfg.model.flavor} ({n_params / 1e6:.2f}M params, "
            f"{self._attention_summary()}) | world {pd.world_size}: pp {pd.pp} dp {pd.dp} cp {pd.cp} "
            f"tp {pd.tp} | cp layout {cfg.cp_layout}, comm {self._comm_summary()}, backend {cfg.parallelism.context_parallel_backend} | ac {cfg.activation_checkpoint.mode}"
            f"{f' | compile {cfg.compile.backend}' if cfg.compile.enable else ''} | seq_len "
            f"{cfg.training.seq_len} | device {self.device.type}"
        )
        if comm.reason:  # the cost model chose: say why, with every alternative's predicted time
            self.metrics.info(f"cp comm {cfg.parallelism.context_parallel_comm}: {comm.reason}")
            for line in comm.table:
                self.metrics.info(f"  predicted per attention layer (fwd+bwd): {line}")
        return model.args, pm

    def _comm_summary(self) -> str:
        named, comm = self.cfg.parallelism.context_parallel_comm, self.cp_comm
        text = comm.comm + (f" (a2a {comm.a2a_size})" if comm.a2a_size else "")
        return text if named == comm.comm and not comm.reason else f"{named} -> {text}"

    def _attention_summary(self) -> str:
        model = self.cfg.model
        text = model.attention_mask
        if model.sliding_window:
            text += f", sliding window {model.sliding_window} ({model.sliding_window_layers} layers)"
        return text

    def _checkpoint_state(self) -> dict[str, Any]:
        parts = self.parallel_model.model_parts

        def get_train_state() -> dict[str, Any]:
            return {"step": self.step, "rng": torch.get_rng_state()}

        def put_train_state(state: dict[str, Any]) -> None:
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"])

        return {
            "model": ModelState(parts),
            "optimizer": OptimizerState(parts, self.optimizers),
            "lr_scheduler": ObjectState(self.schedulers[0].state_dict, self._load_schedulers),
            "dataloader": ObjectState(self.data.loader.state_dict, self.data.loader.load_state_dict),
            "train_state": ObjectState(get_train_state, put_train_state),
        }

    def _load_schedulers(self, state: dict[str, Any]) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)

    def _set_train_timeouts(self) -> None:
        """After the first step (process groups created, kernels warm), switch every group from
        ``comm.init_timeout_seconds`` to the shorter ``comm.train_timeout_seconds`` (as torchtitan does)."""
        if not dist.is_initialized():
            return
        timeout = timedelta(seconds=self.cfg.comm.train_timeout_seconds)
        groups = {dist.group.WORLD, *self.parallel_dims.world_mesh.get_all_groups()}
        groups.add(self.parallel_dims.fsdp_mesh.get_group())
        for group in groups:
            dist.distributed_c10d._set_pg_timeout(timeout, group)

    # ---- the loop ----------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load the latest usable checkpoint (or ``checkpoint.load_step``); returns its step or None."""
        if self.checkpoints is None:
            return None
        step = self.checkpoints.load(
            self._checkpoint_state(), self.cfg.checkpoint.load_step, fingerprint=self.model_fingerprint
        )
        if step is not None:
            self.metrics.info(f"resumed from {self.checkpoints.step_dir(step)} (step {step})")
        return step

    def save_checkpoint(self) -> None:
        """Save the current state as the checkpoint of the current step."""
        assert self.checkpoints is not None
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.step, self._checkpoint_state(), fingerprint=self.model_fingerprint)
        self.metrics.info(f"saved checkpoint {path} in {time.perf_counter() - t0:.2f}s")

    def train_one_step(self) -> StepResult:
        """Run the next optimizer step and log it."""
        cfg, pd = self.cfg, self.parallel_dims
        t0 = time.perf_counter()
        ring_before = dataclasses.replace(self.ring_stats) if self.ring_stats is not None else None
        global_batch = next(self.data.loader)
        validate_token_ids(global_batch["tokens"], self.model_args.vocab_size)
        if not self.use_documents:
            global_batch.pop("document_ids", None)
        if cfg.data.reset_positions:  # rotary positions restart per document; "positions" stay the tokens'
            global_batch["rope_positions"] = global_batch.pop("positions")  # places (shard_batch adds them)
        layout = self._batch_layout(global_batch)
        batch = shard_batch(
            {k: v.to(self.device) for k, v in global_batch.items()}, pd.batch_mesh, layout=layout
        )
        try:
            result = train_step(
                self.parallel_model.model_parts,
                self.optimizers,
                batch,
                loss_mesh=pd.loss_mesh,
                pipeline=self.parallel_model.pipeline,
                max_norm=cfg.training.max_norm,
                accumulation_steps=self.accumulation_steps,
                on_nonfinite="skip" if cfg.training.on_nonfinite == "skip" else "raise",
            )
        except FloatingPointError as e:
            raise FloatingPointError(
                f'step {self.step + 1}: {e}; stopping (training.on_nonfinite = "stop"); the last checkpoint '
                f"holds the state before it"
            ) from None
        lr = self.schedulers[0].get_last_lr()[0]
        if not result.skipped:
            for s in self.schedulers:
                s.step()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = self.data.loader.global_batch_size * cfg.training.seq_len
        tps = tokens / dt
        per_dev = tps / pd.world_size
        achieved = per_dev * self.flops_per_token
        self.metrics.log(
            StepMetrics(
                step=self.step,
                loss=result.loss,
                grad_norm=result.grad_norm,
                lr=lr,
                tokens_per_s=tps,
                tokens_per_s_per_device=per_dev,
                tflops_per_device=achieved / 1e12,
                mfu=achieved / self.peak_flops if self.peak_flops else None,
                peak_memory_gib=peak_memory_bytes(self.device) / 2**30,
                step_time_s=dt,
                skipped=result.skipped,
                cp_work_imbalance=self._work_imbalance(global_batch, layout),
                **self._ring_metrics(ring_before),
            )
        )
        return result

    def _batch_layout(self, global_batch: dict[str, torch.Tensor]) -> LayoutLike:
        """The CP layout of this batch: the configured name, or the balanced rule applied to its documents."""
        if not callable(self.cp_layout):
            return self.cp_layout
        ids = global_batch.get("document_ids")
        if ids is None:  # no document boundaries in this data: one document per row
            ids = torch.zeros_like(global_batch["tokens"])
        global_batch["document_ids"] = ids
        return self.cp_layout(ids, self.parallel_dims.cp)

    def _work_imbalance(self, global_batch: dict[str, torch.Tensor], layout: LayoutLike) -> float | None:
        """max / mean attention work over the CP ranks for this batch (visible pairs of the global layers)."""
        cp = self.parallel_dims.cp
        if cp == 1 or self.rank != 0:  # only rank 0 logs
            return None
        mask = AttentionMask(self.model_args.causal, (-1, -1), global_batch.get("document_ids"))
        rows, seq_len = global_batch["tokens"].shape
        work = layout_work(to_sequence_layout(layout, cp, batch=rows, seq_len=seq_len), mask)
        return float(work.max() / work.float().mean())

    def _ring_metrics(self, before: AttentionStats | None) -> dict[str, Any]:
        """This step's CP communication on this rank: bytes sent and time blocked waiting."""
        now = self.ring_stats
        if now is None or before is None:
            return {}
        now.settle()  # CUDA: the waits timed by events (the step already synchronized)
        sent = now.bytes_sent_forward + now.bytes_sent_backward
        return {
            "cp_bytes_sent": sent - before.bytes_sent_forward - before.bytes_sent_backward,
            "cp_comm_wait_s": now.comm_wait_seconds - before.comm_wait_seconds,
        }

    def train(self) -> list[StepResult]:
        """Resume if possible, train to ``training.steps``, checkpoint on the way; returns the step results."""
        cfg = self.cfg
        resumed = self.resume()
        if resumed is not None and resumed >= cfg.training.steps:
            self.metrics.info(
                f"checkpoint step {resumed} >= training.steps {cfg.training.steps}: nothing to train; raise "
                f"training.steps to continue"
            )
            self.metrics.close()
            return []
        if self.data.summary:
            self.metrics.info(f"data: {self.data.summary}")
        results = []
        try:
            while self.step < cfg.training.steps:
                results.append(self.train_one_step())
                if len(results) == 1:
                    self._set_train_timeouts()
                if self.checkpoints is not None and (
                    self.step % cfg.checkpoint.interval == 0 or self.step == cfg.training.steps
                ):
                    self.save_checkpoint()
        finally:
            self.metrics.close()
        return results
