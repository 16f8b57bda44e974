"""cp_dtensor: context parallelism for PyTorch, native on DTensor and torch.distributed.

Public API (stable names)::

    shard_sequence(x, mesh, seq_dim, layout="zigzag")          this rank's shard of a full tensor
    unshard_sequence(x_local, mesh, seq_dim, layout="zigzag")  the full tensor, natural order
    ring_attention(q, k, v, mesh, *, is_causal, scale, layout, comm)   CP attention on local shards
"""

from cp_dtensor.attention import RingStats, ring_attention, simulate_context_parallel_attention
from cp_dtensor.layout import LAYOUTS, sequence_positions, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "RingStats",
    "ring_attention",
    "sequence_positions",
    "shard_sequence",
    "simulate_context_parallel_attention",
    "unshard_sequence",
]
