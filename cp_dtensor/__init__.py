"""cp_dtensor: context parallelism for PyTorch, native on DTensor and torch.distributed.

Public API (stable names)::

    shard_sequence(x, mesh, seq_dim, layout="zigzag")          this rank's shard of a full tensor
    unshard_sequence(x_local, mesh, seq_dim, layout="zigzag")  the full tensor, natural order
    ring_attention(q, k, v, mesh, *, is_causal, scale, layout, comm, document_ids, window_size)
                                                               CP attention on local shards (masks exact);
                                                               comm p2p / allgather / alltoall / hybrid / auto
    CPSettings(layout=..., comm=..., a2a_size=..., backend=...)  how CP attention runs, passed around whole
    AttentionMask(is_causal, window, document_ids)             the mask of a call, one value (ring_attention(mask=))
    register_strategy(strategy)                                a new CP strategy, selectable by name
    choose_comm(comm, heads=..., kv_heads=..., seq_len=..., cp=...)  the cost model's CP strategy, and why
    balanced_layout(document_ids, cp, *, is_causal, window_size)  a layout object balancing packed documents
    document_attention(q, k, v, *, document_ids, window_size)  SDPA with document / window masks (CP-aware)
    ParallelDims(dp=-1, pp=1, cp=1, tp=1, world_size=...)      degrees -> .build_mesh() 4-D mesh
    ContextParallelAttention(mesh=None, layout=..., comm=...)  a mode: SDPA inside -> ring op
    ContextParallel(layout=..., comm=...)                      ParallelStyle: SDPA inside a module -> ring op
    PrepareSequenceShards(use_local_output=False)               ParallelStyle: DTensor <-> local shards
    apply_context_parallel(model, mesh, attention=..., ...)    the CP plan, applied with parallelize_module
    shard_batch(batch, mesh, layout=...)                       a global batch -> this rank's CP DTensors
    unshard_sequence_output(x, mesh, layout=...)               a CP-sharded output -> natural order
    inspect_sharding(model, *inputs)                           per-module placements and shapes
    generate(model, input_ids, mesh, *, max_new_tokens, ...)   CP prefill + decode against a sharded KV cache
    models.from_pretrained(path, *, dtype, device)             a HuggingFace folder -> our model
    models.save_pretrained(model, path)                        our model -> a folder transformers loads
    models.register_model(spec) / models.get_model_spec(name)  the model-family registry
"""

from cp_dtensor import models
from cp_dtensor.attention import (
    AttentionStats,
    CPSettings,
    Strategy,
    get_strategy,
    register_strategy,
    ring_attention,
    simulate_context_parallel_attention,
    strategy_names,
)
from cp_dtensor.attention.choice import CommChoice, choose_comm
from cp_dtensor.attention.dispatch import ContextParallelAttention, context_parallel_sdpa
from cp_dtensor.attention.functional import document_attention
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.balance import BalancedLayoutRule, balanced_layout, layout_work
from cp_dtensor.context_parallel import apply_context_parallel, build_context_parallel_plan
from cp_dtensor.generation import generate
from cp_dtensor.layout import LAYOUTS, SequenceLayout, sequence_positions, shard_sequence, unshard_sequence
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.sharding import shard_batch, unshard_sequence_output
from cp_dtensor.sharding_table import format_sharding_table, inspect_sharding
from cp_dtensor.styles import ContextParallel, PrepareSequenceShards

__all__ = [
    "LAYOUTS",
    "AttentionMask",
    "AttentionStats",
    "BalancedLayoutRule",
    "CPSettings",
    "CommChoice",
    "ContextParallel",
    "ContextParallelAttention",
    "ParallelDims",
    "PrepareSequenceShards",
    "SequenceLayout",
    "Strategy",
    "apply_context_parallel",
    "balanced_layout",
    "build_context_parallel_plan",
    "choose_comm",
    "context_parallel_sdpa",
    "document_attention",
    "format_sharding_table",
    "generate",
    "get_strategy",
    "inspect_sharding",
    "layout_work",
    "models",
    "register_strategy",
    "ring_attention",
    "sequence_positions",
    "shard_batch",
    "shard_sequence",
    "simulate_context_parallel_attention",
    "strategy_names",
    "unshard_sequence",
    "unshard_sequence_output",
]
