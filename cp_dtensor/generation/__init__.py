"""Generation and evaluation under CP: a prefill through the CP attention call, a KV cache sharded along the
sequence, decode steps that merge every rank's partial attention by log-sum-exp (Notes [CP generation],
[Sharded KV cache], [Generation mode])."""

from cp_dtensor.generation.generate import GenerationStats, generate
from cp_dtensor.generation.kv_cache import LayerCache, ShardedKVCache, decode_attention, merge_partials
from cp_dtensor.generation.mode import GenerationAttention
from cp_dtensor.generation.tensor_parallel import apply_tp_for_generation

__all__ = [
    "GenerationAttention",
    "GenerationStats",
    "LayerCache",
    "ShardedKVCache",
    "apply_tp_for_generation",
    "decode_attention",
    "generate",
    "merge_partials",
]
