"""Shape and numerics of a Llama-style decoder: one dataclass for every family built from our modules.

Llama 3 and Qwen3 (dense) differ only in fields here: Qwen3 normalizes queries and keys per head
(``qk_norm``), may set the head size apart from ``dim / n_heads`` (``attention_head_dim``) and its
SwiGLU width explicitly (``ffn_hidden_size``), and its small models tie the output projection to the token
embedding (``tie_embeddings``). The trainer reads these fields for its checks, memory estimate and FLOPs,
whatever family built the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cp_dtensor.models.rope import RopeScaling

__all__ = ["ModelArgs"]


@dataclass
class ModelArgs:
    """Shape and numerics of a Llama-3-style model.

    Attributes:
        dim: Hidden size (model width).
        n_layers: Number of transformer blocks.
        n_heads: Number of query heads; `dim` must be divisible by it unless `attention_head_dim` is set.
        n_kv_heads: Number of key/value heads (GQA); `n_heads` must be divisible by it. `None` means
            `n_heads` (plain multi-head attention).
        vocab_size: Number of token ids (embedding rows and logits).
        multiple_of: The SwiGLU hidden size is rounded up to a multiple of this.
        ffn_dim_multiplier: Optional factor applied to the SwiGLU hidden size (Llama 3 uses 1.3).
        norm_eps: Epsilon of the RMSNorms.
        rope_theta: Base of the rotary position embedding frequencies.
        max_seq_len: Longest sequence the model is meant for. The model does not allocate anything from it
            (RoPE is computed from positions on the fly); trainers and configs validate against it.
        causal: True for a decoder (causal attention), False for bidirectional (encoder) attention.
        sliding_window: Attention window in tokens of the local layers (0 = none): a query sees the
            ``sliding_window`` keys up to itself (causal) or that many on each side (bidirectional).
        sliding_window_layers: Which layers are local: ``"all"``, or ``"alternate"`` (even layers local,
            odd layers global, as several current open models do).
        attention_head_dim: Size of one attention head when it is not ``dim // n_heads`` (Qwen3's explicit
            ``head_dim``); None derives it.
        ffn_hidden_size: SwiGLU inner width when given explicitly (HuggingFace ``intermediate_size``); None
            derives it from ``multiple_of`` and ``ffn_dim_multiplier`` as Llama 3 does.
        qk_norm: RMS-normalize queries and keys per head before RoPE (Qwen3).
        tie_embeddings: The output projection shares its weight with the token embedding.
        rope_scaling: RoPE frequency scaling for context extension (Note [RoPE scaling]).

    Packed documents are not a shape property: pass ``document_ids`` to the forward.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 131072
    causal: bool = True
    sliding_window: int = 0
    sliding_window_layers: str = "all"
    attention_head_dim: int | None = None
    ffn_hidden_size: int | None = None
    qk_norm: bool = False
    tie_embeddings: bool = False
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)

    def __post_init__(self) -> None:
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ValueError(
                f"ModelArgs.sliding_window must be an int >= 0 (0 = off), got {self.sliding_window!r}"
            )
        if self.sliding_window_layers not in ("all", "alternate"):
            raise ValueError(
                f"ModelArgs.sliding_window_layers must be 'all' or 'alternate', got {self.sliding_window_layers!r}"
            )
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        for name in ("n_kv_heads", "attention_head_dim", "ffn_hidden_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"ModelArgs.{name} must be a positive int or None, got {value!r}")
        if self.attention_head_dim is None and self.dim % self.n_heads != 0:
            raise ValueError(
                f"ModelArgs.dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of dim, or set attention_head_dim"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim = {self.head_dim} must be even for rotary embeddings; change dim={self.dim}, "
                f"n_heads={self.n_heads} or attention_head_dim={self.attention_head_dim}"
            )
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(
                f"ModelArgs.n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}; "
                f"grouped-query attention needs an equal number of query heads per KV head"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"ModelArgs.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelArgs.rope_theta must be > 0, got {self.rope_theta}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(
                f"ModelArgs.ffn_dim_multiplier must be > 0 or None, got {self.ffn_dim_multiplier}"
            )
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"ModelArgs.rope_scaling must be a RopeScaling, got {type(self.rope_scaling).__name__}"
            )

    def window_size(self, layer_id: int) -> tuple[int, int]:
        """``(left, right)`` attention window of a layer (flash-attn convention; -1 = none).

        Args:
            layer_id: Index of the layer.

        Returns:
            The window; ``(-1, -1)`` for a global layer.
        """
        local = self.sliding_window > 0 and (self.sliding_window_layers == "all" or layer_id % 2 == 0)
        if not local:
            return (-1, -1)
        reach = self.sliding_window - 1 if self.causal else self.sliding_window
        return (reach, 0 if self.causal else reach)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (`n_kv_heads`, or `n_heads` when that is None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        """Size of one attention head: `attention_head_dim`, or `dim // n_heads`."""
        return self.attention_head_dim if self.attention_head_dim is not None else self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        """Width of all query heads together, `n_heads * head_dim` (the input width of `wo`)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads together, `kv_heads * head_dim`."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_hidden_dim(self) -> int:
        """Hidden size of the SwiGLU feed-forward.

        `ffn_hidden_size` when set; else as in Llama 3 / torchtitan: `int(2 * 4 * dim / 3)`, times
        `ffn_dim_multiplier` if set, rounded up to `multiple_of`.
        """
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
