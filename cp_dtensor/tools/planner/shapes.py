"""Model shapes the cost model prices: :class:`ModelShape`, the seed's GPT-175B, the Llama and Qwen3 flavors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cp_dtensor.models.llama import LLAMA3_FLAVORS, ModelArgs
from cp_dtensor.models.qwen3 import QWEN3_FLAVORS

__all__ = ["GPT_175B", "ModelShape", "build_model_shape"]


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder, as the cost model needs it.

    Attributes:
        name: A label for tables.
        dim: Hidden size ``h``.
        n_layers: Number of transformer blocks ``L``.
        n_heads: Query heads ``a``.
        n_kv_heads: Key/value heads ``g`` (``a`` for MHA, 1 for MQA).
        ffn_hidden: Hidden size ``f`` of the MLP.
        vocab_size: ``V``.
        mlp: ``"swiglu"`` (3 matrices, Llama) or ``"gelu"`` (2 matrices, GPT).
        tied_embeddings: The output head shares the embedding matrix (counted once in the parameters).
        dropout: Hidden dropout after attention and MLP (its masks are stored for backward).
        causal: Causal (decoder) attention; False for bidirectional.
        attention_head_dim: Size of one head when it is not ``h / a`` (Qwen3's explicit ``head_dim``); None
            derives it.
        qk_norm: Per-head RMSNorm of queries and keys (Qwen3): ``2 * hd`` more parameters per block.
    """

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    tied_embeddings: bool = False
    dropout: bool = False
    causal: bool = True
    attention_head_dim: int | None = None
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")
        if self.attention_head_dim is not None and (
            not isinstance(self.attention_head_dim, int) or self.attention_head_dim <= 0
        ):
            raise ValueError(
                f"ModelShape.attention_head_dim must be a positive int, got {self.attention_head_dim!r}"
            )
        if self.attention_head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"ModelShape.dim={self.dim} must be divisible by n_heads={self.n_heads} unless attention_head_dim is set"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelShape.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"ModelShape.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")

    @property
    def head_dim(self) -> int:
        """``hd``: ``attention_head_dim``, or ``h / a``."""
        return self.attention_head_dim if self.attention_head_dim is not None else self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        """``a * hd``: width of Q (and the input of the output projection); ``h`` unless hd is explicit."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """``kv = g * hd``: width of K (and of V)."""
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of the MLP: 3 for SwiGLU, 2 for GELU."""
        return 3 if self.mlp == "swiglu" else 2

    @property
    def layer_matmul_params(self) -> int:
        """``W``: weights of one block that take part in matmuls (wq, wk, wv, wo and the MLP)."""
        h = self.dim
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + self.mlp_matrices * h * self.ffn_hidden

    @property
    def layer_params(self) -> int:
        """Parameters of one block: matmul weights, the two norm weights and the q/k norms (``qk_norm``)."""
        return self.layer_matmul_params + 2 * self.dim + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def head_params(self) -> int:
        """Output projection ``h * V`` (also used as the matmul size when embeddings are tied)."""
        return self.dim * self.vocab_size

    @property
    def embedding_params(self) -> int:
        """Embedding table parameters not shared with the head (0 when tied)."""
        return 0 if self.tied_embeddings else self.dim * self.vocab_size

    @property
    def params(self) -> int:
        """All parameters (blocks, final norm, head, untied embedding)."""
        return self.n_layers * self.layer_params + self.dim + self.head_params + self.embedding_params

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: every block's ``W`` and the output head."""
        return self.n_layers * self.layer_matmul_params + self.head_params

    @classmethod
    def from_model_args(cls, args: ModelArgs, name: str = "llama") -> ModelShape:
        """The shape of a model built from ``args`` (SwiGLU, no dropout; Llama 3 or Qwen3).

        Args:
            args: Model arguments, e.g. ``LLAMA3_FLAVORS["8B"]`` or ``QWEN3_FLAVORS["0.6B"]``.
            name: Label for tables.

        Returns:
            The shape.
        """
        return cls(
            name=name,
            dim=args.dim,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            n_kv_heads=args.kv_heads,
            ffn_hidden=args.ffn_hidden_dim,
            vocab_size=args.vocab_size,
            mlp="swiglu",
            tied_embeddings=args.tie_embeddings,
            dropout=False,
            causal=args.causal,
            attention_head_dim=args.attention_head_dim,
            qk_norm=args.qk_norm,
        )

    @classmethod
    def from_flavor(cls, flavor: str) -> ModelShape:
        """The shape of ``LLAMA3_FLAVORS[flavor]`` (e.g. ``"debug"``, ``"small"``, ``"8B"``, ``"70B"``)."""
        if flavor not in LLAMA3_FLAVORS:
            raise ValueError(f"Unknown Llama flavor {flavor!r}; choose from {sorted(LLAMA3_FLAVORS)}")
        return cls.from_model_args(LLAMA3_FLAVORS[flavor], name=f"llama3_{flavor}")


# The seed's model (Figure 2): GPT-3 175B, MHA, GELU MLP 4h, tied embeddings, hidden dropout.
GPT_175B = ModelShape(
    name="gpt175b",
    dim=12288,
    n_layers=96,
    n_heads=96,
    n_kv_heads=96,
    ffn_hidden=4 * 12288,
    vocab_size=51200,
    mlp="gelu",
    tied_embeddings=True,
    dropout=True,
)


def build_model_shape(name: str) -> ModelShape:
    """A model by name: ``gpt175b``, ``llama3_<flavor>`` (``llama3_8b``), ``qwen3_<flavor>`` (``qwen3_8b``) or
    a raw Llama flavor.

    Args:
        name: Case-insensitive model name; flavors are looked up in ``LLAMA3_FLAVORS`` / ``QWEN3_FLAVORS``.

    Returns:
        The shape.
    """
    key = name.strip()
    if key.lower() in ("gpt175b", "gpt-175b", "gpt3_175b"):
        return GPT_175B
    if key.lower().startswith("qwen3_"):
        by_lower = {k.lower(): k for k in QWEN3_FLAVORS}
        flavor = key[len("qwen3_") :].lower()
        if flavor in by_lower:
            return ModelShape.from_model_args(
                QWEN3_FLAVORS[by_lower[flavor]], name=f"qwen3_{by_lower[flavor]}"
            )
    else:
        flavor = key[len("llama3_") :] if key.lower().startswith("llama3_") else key
        by_lower = {k.lower(): k for k in LLAMA3_FLAVORS}
        if flavor.lower() in by_lower:
            return ModelShape.from_flavor(by_lower[flavor.lower()])
    choices = [
        "gpt175b",
        *(f"llama3_{k.lower()}" for k in LLAMA3_FLAVORS),
        *LLAMA3_FLAVORS,
        *(f"qwen3_{k.lower()}" for k in QWEN3_FLAVORS),
    ]
    raise ValueError(f"Unknown model {name!r}; choose from {choices}")
