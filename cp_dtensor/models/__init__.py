"""Plain models (no parallelism inside); parallelism is applied from outside by `cp_dtensor.parallelize`."""

from cp_dtensor.models.llama import (
    LLAMA3_FLAVORS,
    Attention,
    FeedForward,
    ModelArgs,
    RMSNorm,
    RotaryEmbedding,
    ScaledDotProductAttention,
    Transformer,
    TransformerBlock,
    apply_rotary_emb,
    build_llama,
    count_params,
    model_flops_per_token,
)

__all__ = [
    "LLAMA3_FLAVORS",
    "Attention",
    "FeedForward",
    "ModelArgs",
    "RMSNorm",
    "RotaryEmbedding",
    "ScaledDotProductAttention",
    "Transformer",
    "TransformerBlock",
    "apply_rotary_emb",
    "build_llama",
    "count_params",
    "model_flops_per_token",
]
