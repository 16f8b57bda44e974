"""Parameter names and layouts between HuggingFace's Llama / Qwen3 and cp_dtensor's modules.

Note [q/k permutation]
~~~~~~~~~~~~~~~~~~~~~~
Both rotate the same pairs of head dims by the same angles, but they number the dims differently.
cp_dtensor rotates interleaved pairs (2i, 2i+1) (Meta's original layout); HuggingFace rotates (i, i + D/2)
("rotate_half"). HuggingFace's conversion script permuted the rows of ``q_proj`` and ``k_proj`` inside every
head to get there; reading a HuggingFace checkpoint undoes that permutation::

    rows of one head (D = 8)    HF: 0 1 2 3 | 4 5 6 7          pair i = (row i, row i + D/2)
                                    a b c d   A B C D
    cp_dtensor (interleaved):       a A b B c C d D            pair i = (row 2i, row 2i + 1)

    ours[h, 2i + c] = hf[h, c * D/2 + i]      c in {0, 1}, i < D/2
    HF -> ours: view (H, 2, D/2, in) -> transpose(1, 2) -> (H * D, in); ours -> HF: the inverse

Attention scores are sums over head dims of q_d k_d, so renumbering the dims of q and k alike changes
nothing; v and o are not touched. Qwen3's per-head q/k RMSNorm scales dims one by one, so its weight (one
head, D entries) is renumbered the same way (the RMS itself does not depend on the order). The conversion
is a pure index permutation: logits match transformers up to fp32 summation order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.hf.config import (
    args_from_hf_config,
    hf_architecture,
    hf_config_from_args,
    read_hf_config,
)
from cp_dtensor.models.registry import hf_architectures

__all__ = [
    "LLAMA_ADAPTER",
    "QWEN3_ADAPTER",
    "HFAdapter",
    "clean_param_name",
    "permute_from_hf",
    "permute_to_hf",
]

# Wrappers that insert a module level into parameter names (activation checkpointing, torch.compile).
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")

# cp_dtensor name -> HuggingFace name; "{i}" is the layer index.
_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_PERMUTED = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.q_norm.weight",
    "attention.k_norm.weight",
)
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def clean_param_name(name: str) -> str:
    """A parameter's name without the levels that wrappers insert (activation checkpointing, compile).

    Args:
        name: A name from ``named_parameters()``.

    Returns:
        E.g. ``"layers.0.attention.wq.weight"`` for ``"layers.0._checkpoint_wrapped_module.attention.wq.weight"``.
    """
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def permute_from_hf(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of HuggingFace's q/k layout -> cp_dtensor's interleaved layout (Note [q/k permutation]).

    Args:
        weight: (H * D, ...) rows of whole heads (a 1-D q/k norm weight is one head).
        head_dim: D.

    Returns:
        The permuted tensor, same shape.
    """
    rest = weight.shape[1:]
    heads = weight.shape[0] // head_dim
    halves = weight.reshape(heads, 2, head_dim // 2, *rest)  # (H, 2, D/2, ...): [h, c, i] = HF row c*D/2 + i
    return halves.transpose(1, 2).reshape(weight.shape)  # [h, i, c] = our row 2i + c


def permute_to_hf(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`permute_from_hf`.

    Args:
        weight: (H * D, ...) rows in cp_dtensor's layout.
        head_dim: D.

    Returns:
        The rows in HuggingFace's layout, same shape.
    """
    rest = weight.shape[1:]
    heads = weight.shape[0] // head_dim
    pairs = weight.reshape(heads, head_dim // 2, 2, *rest)  # (H, D/2, 2, ...): [h, i, c] = our row 2i + c
    return pairs.transpose(1, 2).reshape(weight.shape)  # [h, c, i] = HF row c*D/2 + i


@dataclass(frozen=True)
class HFAdapter:
    """HuggingFace checkpoint conversion of one family built from cp_dtensor's Llama-style modules.

    Attributes:
        architecture: The transformers class in config.json, e.g. ``"LlamaForCausalLM"``.
        model_type: config.json's ``model_type``, e.g. ``"llama"``.
        qk_norm: The family normalizes q and k per head (Qwen3).
    """

    architecture: str
    model_type: str
    qk_norm: bool = False

    def args_from_config(self, config: Mapping[str, Any]) -> ModelArgs:
        """:class:`ModelArgs` of a config.json of this architecture.

        Args:
            config: The parsed config.json.

        Returns:
            The args.
        """
        return args_from_hf_config(config, qk_norm=self.qk_norm)

    def read_model_args(self, path: str | Path, *, family: str) -> ModelArgs:
        """:class:`ModelArgs` from ``path``/config.json, after checking that it is this architecture.

        Args:
            path: A HuggingFace model folder.
            family: The ``model.name`` asking (for the message).

        Returns:
            The args.

        Raises:
            ValueError: config.json names another architecture; the message says which ``model.name``
                serves it, or that none does.
        """
        config = read_hf_config(path)
        arch = hf_architecture(config)
        if arch != self.architecture:
            served = hf_architectures()
            fix = (
                f'set model.name = "{served[arch]}"'
                if arch in served
                else f"cp_dtensor reads {sorted(served)}; this architecture is not supported"
            )
            raise ValueError(
                f"{Path(path) / 'config.json'} is a {arch or 'model without architectures'}, but model.name "
                f"{family!r} reads {self.architecture}; {fix}."
            )
        return self.args_from_config(config)

    def hf_config(
        self, args: ModelArgs, *, dtype: str, base: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The config.json of a model with ``args`` (Note [RoPE in config.json]).

        Args:
            args: The model's args.
            dtype: Dtype of the saved weights (``"float32"``, ``"bfloat16"``, ...).
            base: The config it was loaded from, if any (its other keys are kept).

        Returns:
            The config dict.
        """
        return hf_config_from_args(
            args, architecture=self.architecture, model_type=self.model_type, dtype=dtype, base=base
        )

    def hf_name(self, name: str) -> str:
        """The HuggingFace key of one of our parameters.

        Args:
            name: Our parameter name (wrapper levels are removed first).

        Returns:
            E.g. ``"model.layers.3.self_attn.q_proj.weight"`` for ``"layers.3.attention.wq.weight"``.

        Raises:
            KeyError: The parameter has no HuggingFace counterpart.
        """
        name = clean_param_name(name)
        match = _LAYER.match(name)
        if match:
            template = _NAMES.get(f"layers.{{i}}.{match.group(2)}")
            if template is not None:
                return template.format(i=match.group(1))
        elif name in _NAMES:
            return _NAMES[name]
        raise KeyError(f"parameter {name!r} has no HuggingFace {self.architecture} counterpart")

    def permuted_head_dim(self, name: str, args: ModelArgs) -> int | None:
        """The head size whose rows are renumbered for a parameter (q, k and their norms), else None.

        Args:
            name: Our parameter name.
            args: The model's args.

        Returns:
            ``args.head_dim`` or None.
        """
        return args.head_dim if clean_param_name(name).endswith(_PERMUTED) else None

    def from_hf(self, name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
        """A whole HuggingFace tensor in our layout.

        Args:
            name: Our parameter name.
            tensor: The checkpoint's tensor.
            args: The model's args.

        Returns:
            The tensor, q/k rows renumbered (Note [q/k permutation]).
        """
        head_dim = self.permuted_head_dim(name, args)
        return tensor if head_dim is None else permute_from_hf(tensor, head_dim)

    def to_hf(self, name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
        """One of our whole tensors in HuggingFace's layout.

        Args:
            name: Our parameter name.
            tensor: The whole (gathered) tensor.
            args: The model's args.

        Returns:
            The tensor, q/k rows renumbered back.
        """
        head_dim = self.permuted_head_dim(name, args)
        return tensor if head_dim is None else permute_to_hf(tensor, head_dim)


LLAMA_ADAPTER = HFAdapter("LlamaForCausalLM", "llama")
"""Llama 3 / 3.1 / 3.2 (GQA, tied or untied embeddings)."""

QWEN3_ADAPTER = HFAdapter("Qwen3ForCausalLM", "qwen3", qk_norm=True)
"""Qwen3 dense (q/k RMSNorm, explicit head_dim)."""
