"""A Llama-3-style decoder that knows nothing of parallelism.

The structure and the parameter names follow torchtitan's llama3 model so that its parallelize plans
(tensor parallel styles keyed by module name, FSDP per block, pipeline stages that delete layers) carry over:

```
Transformer
  tok_embeddings   nn.Embedding(vocab_size, dim)          (None on later pipeline stages)
  rope             RotaryEmbedding (inv_freq buffer, no parameters)
  layers           nn.ModuleDict {"0": TransformerBlock, ..., "n-1": ...}
    attention_norm RMSNorm
    attention      Attention: wq, wk, wv, wo; sdpa = ScaledDotProductAttention(causal)
    ffn_norm       RMSNorm
    feed_forward   FeedForward (SwiGLU): w1, w2, w3
  norm             RMSNorm                                 (None on earlier pipeline stages)
  output           nn.Linear(dim, vocab_size, bias=False)  (None on earlier pipeline stages)
```

Two choices matter for parallelism and are kept deliberately:

* Head counts are never written into reshapes (`view(B, S, -1, head_dim)`): tensor parallelism shards
  `wq`/`wk`/`wv` column-wise, so each rank sees only its local heads.
* Attention itself is the separate submodule `Attention.sdpa`, whose forward is exactly one call of
  `F.scaled_dot_product_attention`. Context parallelism installs its hooks on that module; K and V are passed
  with their `n_kv_heads` heads (no repeat), `enable_gqa` tells SDPA to broadcast them.

RoPE is computed on the fly from global token `positions`: under context parallelism a rank holds a
non-contiguous set of positions (zigzag layout), so the positions travel with the tokens.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from cp_dtensor.attention.functional import document_attention

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
    "training_flops_per_token",
]


@dataclass
class ModelArgs:
    """Shape and numerics of a Llama-3-style model.

    Attributes:
        dim: Hidden size (model width).
        n_layers: Number of transformer blocks.
        n_heads: Number of query heads; `dim` must be divisible by it.
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
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0):
            raise ValueError(f"ModelArgs.n_kv_heads must be a positive int or None, got {self.n_kv_heads!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"ModelArgs.dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of dim"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings; "
                f"change dim={self.dim} or n_heads={self.n_heads}"
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

    def window_size(self, layer_id: int) -> tuple[int, int]:
        """``(left, right)`` attention window of layer ``layer_id`` (flash-attn convention; -1 = none)."""
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
        """Size of one attention head, `dim // n_heads`."""
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Hidden size of the SwiGLU feed-forward, computed as in Llama 3 / torchtitan.

        `int(2 * 4 * dim / 3)`, times `ffn_dim_multiplier` if set, rounded up to `multiple_of`.
        """
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


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
    # Llama 3.1 shapes (about 8.03e9 and 70.6e9 parameters).
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
    ),
}


# --------------------------------------------------------------------------------------------------------
# Deterministic initialization
# --------------------------------------------------------------------------------------------------------


def _param_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from the model seed and a parameter's structural name."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _local_device(param: torch.Tensor) -> torch.device:
    """Device of the data behind `param` (the local shard's device for a DTensor)."""
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.device


def _init_trunc_normal(param: torch.Tensor, std: float, key: str, seed: int | None) -> None:
    """Fill `param` with a normal(0, std) truncated at +-3 std.

    With `seed=None` the global RNG is used (for DTensors, DTensor's own RNG tracker keeps sharded results
    equal to the full tensor). With a seed, the full tensor is drawn in fp32 from a generator seeded by
    (seed, key) on the parameter's device type and then sliced to the local shard, so the weights do not
    depend on how the model is sharded, on the parameter dtype (up to rounding), nor on which other
    parameters exist (pipeline stages delete layers).
    """
    if seed is None:
        nn.init.trunc_normal_(param, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return
    device = _local_device(param)
    if device.type == "meta":
        raise RuntimeError(
            f"cannot initialize {key}: it lives on the meta device; call model.to_empty(device=...) "
            f"before init_weights()"
        )
    generator = torch.Generator(device=device)
    generator.manual_seed(_param_seed(seed, key))
    full = torch.empty(param.shape, dtype=torch.float32, device=device)
    nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
    _copy_full_into(param, full)


def _init_ones(param: torch.Tensor) -> None:
    """Fill `param` with ones (works for plain tensors and DTensors)."""
    nn.init.ones_(param)


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full (unsharded) tensor `full` into `param`, slicing it if `param` is a DTensor."""
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the same full tensor, slice locally without communication.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in (at least) fp32.

    Args:
        dim: Size of the normalized (last) dimension.
        eps: Added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize over the last dimension.

        Args:
            x: Input of shape (..., dim).

        Returns:
            Tensor of the same shape and dtype as `x`.
        """
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(compute_dtype)  # (..., dim)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        """Set the scale to ones."""
        with torch.no_grad():
            _init_ones(self.weight)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding table computed on the fly from token positions.

    Only the inverse frequencies are stored (a non-persistent buffer, so checkpoints do not carry it).
    The rotation is the interleaved-pair convention of Meta's Llama / torchtitan: dims (2i, 2i+1) of a head
    are rotated by the angle `position * inv_freq[i]`.

    Args:
        head_dim: Size of one attention head (even).
        theta: RoPE base.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._compute_inv_freq(device=None), persistent=False)

    def _compute_inv_freq(self, device: torch.device | None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        return (1.0 / (self.theta**exponents)).to(torch.float32)  # (head_dim // 2,)

    def reset_parameters(self) -> None:
        """Recompute the inverse frequencies in place (needed after `to_empty` from the meta device)."""
        with torch.no_grad():
            self.inv_freq.copy_(self._compute_inv_freq(device=self.inv_freq.device))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Build the cos/sin table for the given positions.

        Args:
            positions: Integer token positions of shape (B, S) or (1, S).

        Returns:
            Table of shape (B, S, head_dim // 2, 2) holding (cos, sin) in the last dim, in fp32 (fp64 if the
            module was cast to fp64).
        """
        inv_freq = self.inv_freq
        if inv_freq.dtype not in (torch.float32, torch.float64):
            # The module was cast to a low-precision dtype: recompute rather than use rounded frequencies.
            inv_freq = self._compute_inv_freq(device=inv_freq.device)
        angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # (B, S, head_dim // 2)
        return torch.stack((angles.cos(), angles.sin()), dim=-1)  # (B, S, head_dim // 2, 2)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of dims of `x` by the angles in `rope` (real-valued, no complex dtype).

    Args:
        x: Queries or keys of shape (B, S, H, D).
        rope: Table from `RotaryEmbedding`, shape (B, S, D // 2, 2) or (1, S, D // 2, 2).

    Returns:
        Rotated tensor of the same shape and dtype as `x`; the rotation is computed in at least fp32.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(compute_dtype).unflatten(-1, (-1, 2))  # (B, S, H, D // 2, 2)
    x_even, x_odd = pairs[..., 0], pairs[..., 1]  # (B, S, H, D // 2)
    rope = rope.to(compute_dtype)
    cos = rope[..., 0].unsqueeze(2)  # (B, S, 1, D // 2)
    sin = rope[..., 1].unsqueeze(2)  # (B, S, 1, D // 2)
    out_even = x_even * cos - x_odd * sin  # (B, S, H, D // 2)
    out_odd = x_even * sin + x_odd * cos  # (B, S, H, D // 2)
    return torch.stack((out_even, out_odd), dim=-1).flatten(-2).type_as(x)  # (B, S, H, D)


class ScaledDotProductAttention(nn.Module):
    """The attention kernel as its own module, so parallel styles can be applied to it.

    Without documents or a window its forward is one call of ``F.scaled_dot_product_attention``; with
    them, one call of :func:`cp_dtensor.document_attention` (exact, only visible pairs computed). Under
    context parallelism the ``ContextParallel`` style turns either into the ring op.

    Args:
        causal: Whether attention is causal (decoder) or bidirectional.
        window_size: ``(left, right)`` sliding window (-1 = unbounded).
    """

    def __init__(self, causal: bool, window_size: tuple[int, int] = (-1, -1)) -> None:
        super().__init__()
        self.causal = causal
        self.window_size = tuple(window_size)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend `q` to `k`/`v`.

        Args:
            q: Queries (B, Hq, S, D).
            k: Keys (B, Hkv, S, D); Hq must be a multiple of Hkv.
            v: Values (B, Hkv, S, D).
            document_ids: (B, S_global) ids of packed documents (natural order, the whole sequence), or None.
            positions: (B, S) global positions of the tokens (checked against the CP layout under CP).

        Returns:
            Attention output (B, Hq, S, D).
        """
        if document_ids is None and self.window_size == (-1, -1):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=self.causal, enable_gqa=q.shape[1] != k.shape[1]
            )
        return document_attention(
            q, k, v, document_ids=document_ids, window_size=self.window_size, is_causal=self.causal,
            positions=positions,
        )  # fmt: skip

    def extra_repr(self) -> str:
        window = "" if self.window_size == (-1, -1) else f", window_size={self.window_size}"
        return f"causal={self.causal}{window}"


class Attention(nn.Module):
    """Multi-head attention with grouped-query KV heads and rotary embeddings.

    Args:
        args: Model shape; uses dim, n_heads, n_kv_heads and causal.
    """

    def __init__(self, args: ModelArgs, layer_id: int = 0) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.sdpa = ScaledDotProductAttention(args.causal, args.window_size(layer_id))

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention over the sequence held by this process.

        Args:
            x: Hidden states (B, S, dim).
            rope: RoPE table (B or 1, S, head_dim // 2, 2) for the positions of `x`.
            document_ids: (B, S_global) ids of packed documents, or None.
            positions: (B, S) global positions of the tokens of `x` (for the CP layout check), or None.

        Returns:
            Output (B, S, dim).
        """
        bsz, seq_len, _ = x.shape
        # Head counts are inferred (-1): tensor parallelism leaves each rank a subset of the heads.
        xq = self.wq(x).view(bsz, seq_len, -1, self.head_dim)  # (B, S, Hq, D)
        xk = self.wk(x).view(bsz, seq_len, -1, self.head_dim)  # (B, S, Hkv, D)
        xv = self.wv(x).view(bsz, seq_len, -1, self.head_dim)  # (B, S, Hkv, D)
        xq = apply_rotary_emb(xq, rope)
        xk = apply_rotary_emb(xk, rope)
        q = xq.transpose(1, 2)  # (B, Hq, S, D)
        k = xk.transpose(1, 2)  # (B, Hkv, S, D)
        v = xv.transpose(1, 2)  # (B, Hkv, S, D)
        out = self.sdpa(q, k, v, document_ids, positions)  # (B, Hq, S, D)
        out = out.transpose(1, 2).contiguous().view(bsz, seq_len, -1)  # (B, S, Hq * D)
        return self.wo(out)  # (B, S, dim)

    def init_weights(self, std_out: float, prefix: str, seed: int | None) -> None:
        """Initialize the projections: std 0.02 for wq/wk/wv, `std_out` for wo.

        Args:
            std_out: Standard deviation of the output projection (depth-scaled by the caller).
            prefix: Structural name of this module (e.g. "layers.3.attention"), part of the per-parameter seed.
            seed: Model seed, or None for the global RNG.
        """
        for name in ("wq", "wk", "wv"):
            _init_trunc_normal(getattr(self, name).weight, 0.02, f"{prefix}.{name}.weight", seed)
        _init_trunc_normal(self.wo.weight, std_out, f"{prefix}.wo.weight", seed)


class FeedForward(nn.Module):
    """SwiGLU feed-forward: `w2(silu(w1(x)) * w3(x))`.

    Args:
        dim: Model width.
        hidden_dim: Inner width (see `ModelArgs.ffn_hidden_dim`).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the SwiGLU MLP.

        Args:
            x: Hidden states (B, S, dim).

        Returns:
            Output (B, S, dim).
        """
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, S, hidden) -> (B, S, dim)

    def init_weights(self, std_out: float, prefix: str, seed: int | None) -> None:
        """Initialize: std 0.02 for w1/w3, `std_out` for the output projection w2.

        Args:
            std_out: Standard deviation of w2 (depth-scaled by the caller).
            prefix: Structural name of this module, part of the per-parameter seed.
            seed: Model seed, or None for the global RNG.
        """
        _init_trunc_normal(self.w1.weight, 0.02, f"{prefix}.w1.weight", seed)
        _init_trunc_normal(self.w3.weight, 0.02, f"{prefix}.w3.weight", seed)
        _init_trunc_normal(self.w2.weight, std_out, f"{prefix}.w2.weight", seed)


class TransformerBlock(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`.

    Args:
        layer_id: Index of the block in the full model (kept when pipeline stages delete other blocks; it sets
            the depth-scaled init and the per-parameter seeds).
        args: Model shape.
    """

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Hidden states (B, S, dim).
            rope: RoPE table (B or 1, S, head_dim // 2, 2).
            document_ids: (B, S_global) ids of packed documents, or None.
            positions: (B, S) global positions of the tokens (for the CP layout check), or None.

        Returns:
            Hidden states (B, S, dim).
        """
        h = x + self.attention(self.attention_norm(x), rope, document_ids, positions)  # (B, S, dim)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, S, dim)

    def init_weights(self, seed: int | None) -> None:
        """Initialize the block; output projections get std `0.02 / sqrt(2 * (layer_id + 1))`.

        Args:
            seed: Model seed, or None for the global RNG.
        """
        std_out = 0.02 / math.sqrt(2 * (self.layer_id + 1))
        prefix = f"layers.{self.layer_id}"
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std_out, f"{prefix}.attention", seed)
        self.feed_forward.init_weights(std_out, f"{prefix}.feed_forward", seed)


class Transformer(nn.Module):
    """Llama-3-style decoder (or bidirectional encoder with `args.causal=False`).

    Pipeline-friendly as in torchtitan: a stage may set `tok_embeddings`, `norm` or `output` to None and
    delete entries of `layers`; the forward then takes hidden states in and/or gives hidden states out.

    Args:
        args: Model shape.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the model (or this pipeline stage of it).

        Args:
            tokens: Token ids (B, S) int64; hidden states (B, S, dim) when `tok_embeddings` is None.
            positions: Global token positions for RoPE, (B, S) or (S,) int64. Defaults to `arange(S)`.
                Under context parallelism pass the positions of the local shard (they follow the layout).
            document_ids: (B, S_global) int ids of the packed documents of each row, for the whole sequence
                in natural order (under CP: not sharded, the same on every CP rank); a token then attends
                only within its document. None: one document per row.
            rope_positions: Rotary positions when they differ from ``positions`` (e.g. restarting at each
                packed document); same shape as ``positions``. ``positions`` then only says where each token
                sits in the sequence (the masked attention and the CP layout check use it).

        Returns:
            Logits (B, S, vocab_size) in the dtype of `output` (fp32 for an fp32 model); the final hidden
            states (B, S, dim) when `output` is None.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, S, dim)
        seq_len = h.shape[1]
        if positions is None:
            positions = torch.arange(seq_len, device=h.device)  # (S,)
        # positions describe the sequence attention sees; a sequence-parallel TP style may hand the blocks a
        # 1/tp slice of it as hidden state (its attention gathers the rest), so only divisibility is checked.
        if positions.dim() not in (1, 2) or positions.shape[-1] % seq_len != 0:
            raise ValueError(
                f"positions must have shape (B, S) or (S,) with S a multiple of {seq_len} (the sequence length "
                f"of the input), got {tuple(positions.shape)}"
            )
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)  # (1, S)
        if rope_positions is not None and rope_positions.dim() == 1:
            rope_positions = rope_positions.unsqueeze(0)  # (1, S)
        rope = self.rope(
            positions if rope_positions is None else rope_positions
        )  # (B or 1, S, head_dim // 2, 2)
        for layer in self.layers.values():
            h = layer(h, rope, document_ids, positions)  # (B, S, dim)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h  # (B, S, dim)
        return self.output(h)  # (B, S, vocab_size)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialize all parameters and buffers (torchtitan-like scheme).

        * `tok_embeddings`: normal, std 1.0 (as torchtitan; the RMSNorms make the scale harmless).
        * `wq`, `wk`, `wv`, `w1`, `w3`: std 0.02.
        * output projections `wo`, `w2` of block `l`: std `0.02 / sqrt(2 * (l + 1))` (depth-scaled).
        * `output`: std `dim ** -0.5`.
        * norms: ones.
        All normals are truncated at 3 std.

        With a seed, every parameter is drawn from its own generator seeded by (seed, structural name, e.g.
        "layers.3.attention.wq.weight"), as the full unsharded tensor, then sliced to the local shard. So the
        same seed gives bit-identical full weights whether the model is whole, wrapped, sharded (FSDP/TP
        DTensors) or split into pipeline stages. The parameters must not be on the meta device (call
        `to_empty` first). With `seed=None` the global RNG is used (DTensor's RNG tracker then keeps
        sharded init consistent).

        Args:
            seed: Model seed, or None for the global RNG.
        """
        self.rope.reset_parameters()
        if self.tok_embeddings is not None:
            _init_trunc_normal(self.tok_embeddings.weight, 1.0, "tok_embeddings.weight", seed)
        for layer in self.layers.values():
            layer.init_weights(seed)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            _init_trunc_normal(self.output.weight, self.args.dim**-0.5, "output.weight", seed)


# --------------------------------------------------------------------------------------------------------
# Builders and accounting
# --------------------------------------------------------------------------------------------------------


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


def count_params(model: nn.Module, *, exclude_embedding: bool = False) -> int:
    """Number of parameters (global sizes, also for DTensor or meta parameters).

    Args:
        model: Any module.
        exclude_embedding: Leave out parameters of `nn.Embedding` modules.

    Returns:
        The parameter count.
    """
    skip: set[int] = set()
    if exclude_embedding:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                skip.update(id(p) for p in module.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in a matmul per token: all linear layers incl. `output`, not embeddings/norms."""
    dim, kv_dim, hidden = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    per_layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden  # wq, wo, wk, wv, w1, w2, w3
    return args.n_layers * per_layer + dim * args.vocab_size


def training_flops_per_token(
    *, matmul_params: int, n_layers: int, attention_dim: int, seq_len: int, causal: bool = True
) -> float:
    """Training FLOPs (forward + backward) per token of a decoder, for MFU; the one home of this formula.

    Formula (as torchtitan, plus the causal discount):

        flops = 6 * N + c * 12 * n_layers * attention_dim * seq_len

    * `N` = parameters used in matmuls (all linear layers including `output`; the embedding lookup and norms
      are excluded). Each such weight costs 2 FLOPs per token forward and 4 backward.
    * Attention scores `Q K^T` and `P V` each cost `2 * seq_len * attention_dim` FLOPs per token and layer
      forward (`attention_dim = n_heads * head_dim`, summed over heads), times 3 for forward + backward.
    * `c = 0.5` for causal attention (only the lower triangle is computed), 1 otherwise.

    Args:
        matmul_params: `N`.
        n_layers: Transformer blocks.
        attention_dim: `n_heads * head_dim` (query width).
        seq_len: Sequence length of a sample (the full, unsharded length under context parallelism).
        causal: Causal attention.

    Returns:
        FLOPs per token.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    attention = 12 * n_layers * attention_dim * seq_len
    return float(6 * matmul_params + (0.5 if causal else 1.0) * attention)


def model_flops_per_token(args: ModelArgs, seq_len: int, *, causal: bool | None = None) -> float:
    """Training FLOPs (forward + backward) per token of this Llama, for MFU (:func:`training_flops_per_token`).

    Args:
        args: Model shape.
        seq_len: Sequence length of a sample (the full, unsharded length under context parallelism).
        causal: Override `args.causal`.

    Returns:
        FLOPs per token.
    """
    return training_flops_per_token(
        matmul_params=_matmul_params(args),
        n_layers=args.n_layers,
        attention_dim=args.n_heads * args.head_dim,
        seq_len=seq_len,
        causal=args.causal if causal is None else causal,
    )
