"""The Qwen3 dense family (``model.name = "qwen3"``): Llama's modules with per-head q/k RMSNorm.

Qwen3 differs from Llama 3 in fields of :class:`~cp_dtensor.models.args.ModelArgs` only: ``qk_norm``
(an RMSNorm over each head's dims of q and k, before RoPE), an explicit ``head_dim`` (128 for every size,
so the 0.6B model has 16 x 128 = 2048 query dims for a width of 1024), an explicit SwiGLU width, and
tied embeddings for the sizes up to 4B. So it is built, parallelized (plus a TP style for the q/k norms,
see ``apply_tp``) and pipelined like Llama; its HuggingFace adapter reads ``Qwen3ForCausalLM``.
"""

from __future__ import annotations

from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.hf.adapter import QWEN3_ADAPTER
from cp_dtensor.models.modules import Transformer
from cp_dtensor.models.registry import ModelSpec, register_model
from cp_dtensor.parallelize import parallelize_llama
from cp_dtensor.pipeline import split_llama_into_stages

__all__ = ["QWEN3_FLAVORS", "QWEN3_SPEC"]

_QWEN3 = dict(vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, attention_head_dim=128, qk_norm=True)

# Tiny models for CPU tests (head_dim 32 with dim 64: the explicit head size is exercised).
_DEBUG = dict(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_size=128, norm_eps=1e-6,
    rope_theta=1000000.0, attention_head_dim=32, qk_norm=True, max_seq_len=131072,
)  # fmt: skip

QWEN3_FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(**_DEBUG),
    "debug_tied": ModelArgs(**_DEBUG, tie_embeddings=True),
    # Qwen3 shapes (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-8B).
    "0.6B": ModelArgs(
        dim=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        ffn_hidden_size=3072,
        tie_embeddings=True,
        max_seq_len=40960,
        **_QWEN3,
    ),
    "8B": ModelArgs(
        dim=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden_size=12288,
        max_seq_len=40960,
        **_QWEN3,
    ),
}

QWEN3_SPEC = register_model(
    ModelSpec(
        name="qwen3",
        flavors=QWEN3_FLAVORS,
        build=Transformer,
        parallelize=parallelize_llama,
        pipeline_split=split_llama_into_stages,
        hf_adapter=QWEN3_ADAPTER,
        description='Qwen3 dense (flavors debug, 0.6B, 8B, or "hf": a Qwen3ForCausalLM folder)',
    )
)
