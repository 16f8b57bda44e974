"""What the training loop is built from, besides the model: the data, the learning-rate schedule and the
CP strategy of the job."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cp_dtensor.attention.choice import CommChoice, choose_comm
from cp_dtensor.config import JobConfig
from cp_dtensor.data import (
    RECALL_CUE_START_FRACTION,
    GlobalBatchLoader,
    PackedTokenDataset,
    SyntheticRecallDataset,
    build_token_cache,
    load_tokenizer,
)
from cp_dtensor.data.sft import SFTDataset
from cp_dtensor.layout import sequence_positions
from cp_dtensor.models.args import ModelArgs
from cp_dtensor.parallel_dims import ParallelDims

__all__ = ["DataPlacement", "build_lr_lambda", "job_comm_choice", "token_cache_dir", "tokenizer_name"]


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
        head_dim=args.head_dim,
        seq_len=t.seq_len,
        cp=pd.cp,
        tp=pd.tp,
        micro_batch=max(1, rows),
        dtype=torch.bfloat16 if t.mixed_precision_param == "bfloat16" else torch.float32,
        causal=cfg.model.attention_mask != "bidirectional",
        device=device,
        hardware=par.context_parallel_cost_hardware,
        a2a_size=par.context_parallel_a2a_size or None,
    )


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


@dataclass(frozen=True)
class DataPlacement:
    """Where this process sits for data loading.

    Attributes:
        dp_rank: This rank's index on the data-parallel axis: the loader reads only its rows.
        dp_degree: Data-parallel ranks.
        rank: Global rank: the share of the corpus it tokenizes when the token cache is built.
        world_size: Ranks that build the token cache together.
        barrier: Waits for every rank (required when ``world_size > 1``).
        log: Receives progress lines (rank 0's).
    """

    dp_rank: int = 0
    dp_degree: int = 1
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None
    log: Callable[[str], None] | None = None


def tokenizer_name(cfg: JobConfig) -> str:
    """``data.tokenizer``, where a HuggingFace model brings its own: "byte" (the default) then means
    ``model.hf_assets_path``'s tokenizer.json."""
    if cfg.data.tokenizer == "byte" and cfg.model.hf_assets_path:
        return cfg.model.hf_assets_path
    return cfg.data.tokenizer


def token_cache_dir(cfg: JobConfig) -> Path:
    """``data.cache_dir``, relative to ``job.dump_folder`` unless absolute."""
    path = Path(cfg.data.cache_dir).expanduser()
    return path if path.is_absolute() else Path(cfg.job.dump_folder) / path


def _build_data(
    cfg: JobConfig, vocab_size: int, global_batch_size: int, placement: DataPlacement | None = None
) -> _Data:
    """The job's data: packed documents of a corpus (``data.tokenizer``) or the synthetic recall task.

    The loader yields this dp rank's rows of each global batch (``placement``; all rows by default).

    Raises:
        ValueError: ``data.recall_documents = "split"`` without the document_causal mask,
            a tokenizer whose ids exceed the model's vocab_size, a missing ``tokenizers`` / ``datasets``
            library, or what reading the corpus raises (the file named).
        FileNotFoundError: No tokenizer.json at ``data.tokenizer``, or a missing data file.
    """
    t, par, data = cfg.training, cfg.parallelism, cfg.data
    where = placement or DataPlacement()
    rows = {"dp_rank": where.dp_rank, "dp_degree": where.dp_degree}
    cp = par.context_parallel_degree
    document_mask = cfg.model.attention_mask == "document_causal"
    if data.dataset in ("text", "hf", "sft"):
        name = tokenizer_name(cfg)
        try:
            tokenizer = load_tokenizer(name)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data.tokenizer: {e}") from None
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"data.tokenizer {name!r} uses token ids up to {tokenizer.vocab_size - 1} but flavor "
                f"{cfg.model.flavor!r} has vocab_size {vocab_size}; use a flavor with vocab_size >= "
                f"{tokenizer.vocab_size} or a smaller tokenizer."
            )
    if data.dataset == "sft":
        sft = SFTDataset(
            data.paths,
            t.seq_len,
            prompt_field=data.sft_prompt_field,
            completion_field=data.sft_completion_field,
            tokenizer=tokenizer,
            reset_positions=data.reset_positions,
        )
        summary = (
            f"sft, {sft.num_documents} prompt/completion records ({sft.num_truncated} cut to seq_len) in "
            f"{len(sft)} samples of {t.seq_len} tokens, {sft.num_counted} completion tokens counted "
            f"({tokenizer.name} tokenizer)"
        )
        if not document_mask:
            summary += (
                '; model.attention_mask is not "document_causal": packed records see the records before them'
            )
        return _Data(GlobalBatchLoader(sft, global_batch_size, seed=t.seed, **rows), None, summary)
    if data.dataset in ("text", "hf"):
        cache = build_token_cache(
            data.paths,
            tokenizer=tokenizer,
            cache_dir=token_cache_dir(cfg),
            kind=data.dataset,
            text_field=data.jsonl_field,
            rank=where.rank,
            world_size=where.world_size,
            barrier=where.barrier,
            log=where.log,
        )
        dataset = PackedTokenDataset(cache, t.seq_len, reset_positions=data.reset_positions)
        summary = (
            f"{data.dataset}, {dataset.num_documents} documents, {dataset.num_tokens} tokens ({tokenizer.name} "
            f"tokenizer, BOS {tokenizer.BOS}, EOS {tokenizer.EOS}; cache {cache.path}), {len(dataset)} samples "
            f"of {t.seq_len} tokens, {'per-document' if data.reset_positions else 'global'} positions"
        )
        return _Data(GlobalBatchLoader(dataset, global_batch_size, seed=t.seed, **rows), None, summary)
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
                f"cue and ranks {query_ranks} its queries; see Note [Recall across CP ranks] in cp_dtensor/trainer/builders.py."
            )
        summary += f"; cue on CP {_ranks(cue_ranks)}, queries on CP {_ranks(query_ranks)}"
    loader = GlobalBatchLoader(recall, global_batch_size, seed=t.seed, **rows)
    return _Data(loader, recall.chance_loss, summary + ")")
