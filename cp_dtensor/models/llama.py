"""The Llama 3 family: flavors, the builder and its registry entry (``model.name = "llama3"``).

The pieces live in their own modules and are re-exported here, so ``from cp_dtensor.models.llama import
...`` keeps working:

    args.py        ModelArgs (shape and numerics)
    rope.py        RotaryEmbedding, RoPE scaling (Note [RoPE], Note [RoPE scaling])
    modules.py     RMSNorm, Attention, FeedForward, TransformerBlock, Transformer
    init.py        seeded init that does not depend on sharding (Note [Seeded init])
    accounting.py  parameter counts and the training-FLOPs formula
    hf/            HuggingFace checkpoints (LlamaForCausalLM: Llama 3, 3.1, 3.2)
"""

from __future__ import annotations

from dataclasses import replace

from cp_dtensor.models.accounting import (
    count_params,
    matmul_param_count,
    model_flops_per_token,
    training_flops_per_token,
)
from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.hf.adapter import LLAMA_ADAPTER
from cp_dtensor.models.modules import (
    Attention,
    FeedForward,
    RMSNorm,
    ScaledDotProductAttention,
    Transformer,
    TransformerBlock,
)
from cp_dtensor.models.registry import ModelSpec, register_model
from cp_dtensor.models.rope import RopeScaling, RotaryEmbedding, apply_rotary_emb
from cp_dtensor.parallelize import parallelize_llama
from cp_dtensor.pipeline import split_llama_into_stages

__all__ = [
    "LLAMA3_FLAVORS",
    "LLAMA3_SPEC",
    "Attention",
    "FeedForward",
    "ModelArgs",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "ScaledDotProductAttention",
    "Transformer",
    "TransformerBlock",
    "apply_rotary_emb",
    "build_llama",
    "count_params",
    "matmul_param_count",
    "model_flops_per_token",
    "training_flops_per_token",
]

_LLAMA31_ROPE = RopeScaling(
    "llama3", factor=8.0, original_max_position_embeddings=8192, low_freq_factor=1.0, high_freq_factor=4.0
)

_DEBUG = ModelArgs(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=512,
    multiple_of=64,
    rope_theta=10000.0,
    max_seq_len=131072,
)

LLAMA3_FLAVORS: dict[str, ModelArgs] = {
    # Tiny models for CPU tests: a training step on seq 1024 takes well under a second.
    "debug": _DEBUG,
    "debug_mha": replace(_DEBUG, n_kv_heads=4),
    "debug_mqa": replace(_DEBUG, n_kv_heads=1),
    "debug_deep": replace(_DEBUG, n_layers=4),
    "small": ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=512,
        multiple_of=256,
        rope_theta=10000.0,
        max_seq_len=131072,
    ),
    # Llama 3.1 shapes and RoPE (about 8.03e9 and 70.6e9 parameters; 8K context scaled 8x by "llama3").
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        rope_theta=500000.0,
        max_seq_len=131072,
        rope_scaling=_LLAMA31_ROPE,
    ),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
        rope_theta=500000.0,
        max_seq_len=131072,
        rope_scaling=_LLAMA31_ROPE,
    ),
}


def build_llama(flavor: str, **overrides: object) -> Transformer:
    """Build an uninitialized-by-seed `Transformer` of a named flavor.

    The module is created on the current default device (use `with torch.device("meta"):` for shape-only
    models), with PyTorch's default init; call `init_weights(seed)` for the deterministic scheme.

    Args:
        flavor: A key of `LLAMA3_FLAVORS`.
        **overrides: `ModelArgs` fields to replace, e.g. `causal=False` or `vocab_size=258`.

    Returns:
        The model.

    Raises:
        ValueError: For an unknown flavor or an unknown override field.
    """
    if flavor not in LLAMA3_FLAVORS:
        raise ValueError(f"unknown llama flavor {flavor!r}; choose one of {sorted(LLAMA3_FLAVORS)}")
    fields = set(ModelArgs.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelArgs field(s) {unknown} in overrides; valid fields: {sorted(fields)}")
    args = replace(LLAMA3_FLAVORS[flavor], **overrides)
    return Transformer(args)


LLAMA3_SPEC = register_model(
    ModelSpec(
        name="llama3",
        flavors=LLAMA3_FLAVORS,
        build=Transformer,
        parallelize=parallelize_llama,
        pipeline_split=split_llama_into_stages,
        hf_adapter=LLAMA_ADAPTER,
        description='cp_dtensor\'s Llama 3 (flavors debug ... 70B, or "hf": a LlamaForCausalLM folder)',
    )
)
