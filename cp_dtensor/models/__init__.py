"""Model families (plain models: no parallelism inside), their registry and HuggingFace checkpoints.

    ModelSpec / register_model / get_model_spec / model_names   the registry (Note [Model registry])
    from_pretrained(path, *, dtype, device) -> model            a HuggingFace folder -> our model
    save_pretrained(model, path)                                our model -> a folder transformers loads

Built-in families: ``llama3`` (``cp_dtensor.models.llama``), ``qwen3`` (``cp_dtensor.models.qwen3``),
``torchtitan.llama3`` (``cp_dtensor.models.torchtitan_llama3``; needs the torchtitan extra when used).
Parallelism is applied from outside, by the family's ``parallelize`` function.
"""

from cp_dtensor.models.accounting import count_params, model_flops_per_token, training_flops_per_token
from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.hf.pretrained import from_pretrained, save_pretrained
from cp_dtensor.models.llama import LLAMA3_FLAVORS, LLAMA3_SPEC, build_llama
from cp_dtensor.models.modules import (
    Attention,
    FeedForward,
    RMSNorm,
    ScaledDotProductAttention,
    Transformer,
    TransformerBlock,
)
from cp_dtensor.models.qwen3 import QWEN3_FLAVORS, QWEN3_SPEC
from cp_dtensor.models.registry import (
    HF_FLAVOR,
    ModelOptions,
    ModelSpec,
    get_model_spec,
    hf_architectures,
    model_names,
    register_model,
)
from cp_dtensor.models.rope import (
    RopeOverrides,
    RopeScaling,
    RotaryEmbedding,
    apply_rotary_emb,
    rope_inv_freq,
)
from cp_dtensor.models.torchtitan_llama3 import TORCHTITAN_LLAMA3_SPEC

__all__ = [
    "HF_FLAVOR",
    "LLAMA3_FLAVORS",
    "LLAMA3_SPEC",
    "QWEN3_FLAVORS",
    "QWEN3_SPEC",
    "TORCHTITAN_LLAMA3_SPEC",
    "Attention",
    "FeedForward",
    "ModelArgs",
    "ModelOptions",
    "ModelSpec",
    "RMSNorm",
    "RopeOverrides",
    "RopeScaling",
    "RotaryEmbedding",
    "ScaledDotProductAttention",
    "Transformer",
    "TransformerBlock",
    "apply_rotary_emb",
    "build_llama",
    "count_params",
    "from_pretrained",
    "get_model_spec",
    "hf_architectures",
    "model_flops_per_token",
    "model_names",
    "register_model",
    "rope_inv_freq",
    "save_pretrained",
    "training_flops_per_token",
]
