"""The modules of a Llama-3-style decoder that knows nothing of parallelism (Llama 3, Qwen3 dense).

The structure and the parameter names follow torchtitan's llama3 model so that its parallelize plans
(tensor parallel styles keyed by module name, FSDP per block, pipeline stages that delete layers) carry over:

```
Transformer
  tok_embeddings   nn.Embedding(vocab_size, dim)          (None on later pipeline stages)
  rope             RotaryEmbedding (inv_freq buffer, no parameters; Note [RoPE], Note [RoPE scaling])
  layers           nn.ModuleDict {"0": TransformerBlock, ..., "n-1": ...}
    attention_norm RMSNorm
    attention      Attention: wq, wk, wv, wo; q_norm, k_norm (qk_norm only);
                   sdpa = ScaledDotProductAttention(causal)
    ffn_norm       RMSNorm
    feed_forward   FeedForward (SwiGLU): w1, w2, w3
  norm             RMSNorm                                 (None on earlier pipeline stages)
  output           nn.Linear(dim, vocab_size, bias=False)  (None on earlier pipeline stages; its weight is
                                                            tok_embeddings.weight when tie_embeddings)
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

import math

import torch
import torch.nn.functional as F
from torch import nn

from cp_dtensor.attention.functional import document_attention
from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.init import init_ones_, init_trunc_normal_
from cp_dtensor.models.rope import RotaryEmbedding, apply_rotary_emb

__all__ = [
    "Attention",
    "FeedForward",
    "RMSNorm",
    "ScaledDotProductAttention",
    "Transformer",
    "TransformerBlock",
]


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
            init_ones_(self.weight)


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
        layout_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend `q` to `k`/`v`.

        Args:
            q: Queries (B, Hq, S, D).
            k: Keys (B, Hkv, S, D); Hq must be a multiple of Hkv.
            v: Values (B, Hkv, S, D).
            document_ids: (B, S_global) ids of packed documents (natural order, the whole sequence), or None.
            positions: (B, S) global positions of the tokens (checked against the CP layout under CP).
            layout_positions: (B, S_global) the batch's CP layout when it travels with the batch (Note
                [Travelling layout]), or None.

        Returns:
            Attention output (B, Hq, S, D).
        """
        if document_ids is None and self.window_size == (-1, -1) and layout_positions is None:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=self.causal, enable_gqa=q.shape[1] != k.shape[1]
            )
        return document_attention(
            q, k, v, document_ids=document_ids, window_size=self.window_size, is_causal=self.causal,
            positions=positions, layout_positions=layout_positions,
        )  # fmt: skip

    def extra_repr(self) -> str:
        """Causality and window, for ``print(model)``."""
        window = "" if self.window_size == (-1, -1) else f", window_size={self.window_size}"
        return f"causal={self.causal}{window}"


class Attention(nn.Module):
    """Multi-head attention with grouped-query KV heads, rotary embeddings and optional q/k norms.

    Args:
        args: Model shape; uses dim, n_heads, n_kv_heads, head_dim, qk_norm, norm_eps, causal and the
            sliding window of ``layer_id``.
        layer_id: Index of the block (chooses a local or global window).
    """

    def __init__(self, args: ModelArgs, layer_id: int = 0) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.q_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wo = nn.Linear(args.q_dim, args.dim, bias=False)
        # Qwen3: RMSNorm over each head's dims (one scale vector shared by all heads), before RoPE.
        self.q_norm: RMSNorm | None = RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm: RMSNorm | None = RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.sdpa = ScaledDotProductAttention(args.causal, args.window_size(layer_id))

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        layout_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Self-attention over the sequence held by this process.

        Args:
            x: Hidden states (B, S, dim).
            rope: RoPE table (B or 1, S, head_dim // 2, 2) for the positions of `x`.
            document_ids: (B, S_global) ids of packed documents, or None.
            positions: (B, S) global positions of the tokens of `x` (for the CP layout check), or None.
            layout_positions: (B, S_global) the batch's CP layout (Note [Travelling layout]), or None.

        Returns:
            Output (B, S, dim).
        """
        bsz, seq_len, _ = x.shape
        # Head counts are inferred (-1): tensor parallelism leaves each rank a subset of the heads.
        xq = self.wq(x).view(bsz, seq_len, -1, self.head_dim)  # (B, S, Hq, D)
        xk = self.wk(x).view(bsz, seq_len, -1, self.head_dim)  # (B, S, Hkv, D)
        xv = self.wv(x).view(bsz, seq_len, -1, self.head_dim)  # (B, S, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            xq = self.q_norm(xq)  # (B, S, Hq, D)
            xk = self.k_norm(xk)  # (B, S, Hkv, D)
        xq = apply_rotary_emb(xq, rope)
        xk = apply_rotary_emb(xk, rope)
        q = xq.transpose(1, 2)  # (B, Hq, S, D)
        k = xk.transpose(1, 2)  # (B, Hkv, S, D)
        v = xv.transpose(1, 2)  # (B, Hkv, S, D)
        out = self.sdpa(q, k, v, document_ids, positions, layout_positions=layout_positions)  # (B, Hq, S, D)
        out = out.transpose(1, 2).contiguous().view(bsz, seq_len, -1)  # (B, S, Hq * D)
        return self.wo(out)  # (B, S, dim)

    def init_weights(self, std_out: float, prefix: str, seed: int | None) -> None:
        """Initialize the projections: std 0.02 for wq/wk/wv, `std_out` for wo; q/k norms to ones.

        Args:
            std_out: Standard deviation of the output projection (depth-scaled by the caller).
            prefix: Structural name of this module (e.g. "layers.3.attention"), part of the per-parameter seed.
            seed: Model seed, or None for the global RNG.
        """
        for name in ("wq", "wk", "wv"):
            init_trunc_normal_(getattr(self, name).weight, 0.02, f"{prefix}.{name}.weight", seed)
        init_trunc_normal_(self.wo.weight, std_out, f"{prefix}.wo.weight", seed)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


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
        init_trunc_normal_(self.w1.weight, 0.02, f"{prefix}.w1.weight", seed)
        init_trunc_normal_(self.w3.weight, 0.02, f"{prefix}.w3.weight", seed)
        init_trunc_normal_(self.w2.weight, std_out, f"{prefix}.w2.weight", seed)


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
        layout_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Hidden states (B, S, dim).
            rope: RoPE table (B or 1, S, head_dim // 2, 2).
            document_ids: (B, S_global) ids of packed documents, or None.
            positions: (B, S) global positions of the tokens (for the CP layout check), or None.
            layout_positions: (B, S_global) the batch's CP layout (Note [Travelling layout]), or None.

        Returns:
            Hidden states (B, S, dim).
        """
        # the travelling layout as a keyword: TP's input styles describe the four positional inputs
        h = x + self.attention(
            self.attention_norm(x), rope, document_ids, positions, layout_positions=layout_positions
        )  # (B, S, dim)
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
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one Parameter, two users

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
        return_hidden: bool = False,
        layout_positions: torch.Tensor | None = None,
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
            return_hidden: return the final (normed) hidden states without the output projection, e.g. to
                compute the logits of a few positions only (generation: the last prompt token).
            layout_positions: (B, S_global) the batch's CP layout, as ``cp_dtensor.shard_batch`` adds it for
                a layout object or rule (Note [Travelling layout]); passed to every attention call.

        Returns:
            Logits (B, S, vocab_size) in the dtype of `output` (fp32 for an fp32 model); the final hidden
            states (B, S, dim) when `output` is None or ``return_hidden``.
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
            h = layer(h, rope, document_ids, positions, layout_positions)  # (B, S, dim)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None or return_hidden:
            return h  # (B, S, dim)
        return self.output(h)  # (B, S, vocab_size)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialize all parameters and buffers (torchtitan-like scheme).

        * `tok_embeddings`: normal, std 1.0 (as torchtitan; the RMSNorms make the scale harmless); std 0.02
          when tied to the output.
        * `wq`, `wk`, `wv`, `w1`, `w3`: std 0.02.
        * output projections `wo`, `w2` of block `l`: std `0.02 / sqrt(2 * (l + 1))` (depth-scaled).
        * `output`: std `dim ** -0.5`.
        * norms (incl. q/k norms): ones.
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
        self.init_buffers()
        tied = self.args.tie_embeddings
        if self.tok_embeddings is not None:
            # A tied embedding is also the output projection: the output's scale, not unit variance.
            std = 0.02 if tied else 1.0
            init_trunc_normal_(self.tok_embeddings.weight, std, "tok_embeddings.weight", seed)
        for layer in self.layers.values():
            layer.init_weights(seed)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not tied:
            init_trunc_normal_(self.output.weight, self.args.dim**-0.5, "output.weight", seed)

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> Transformer:
        """``nn.Module.to_empty``, then the output projection tied to the embedding again.

        ``to_empty`` allocates a new parameter for each module that holds one, which would split a tied
        weight in two.
        """
        super().to_empty(device=device, recurse=recurse)
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the buffers (the RoPE frequencies) without touching parameters.

        For a model whose parameters are loaded from a checkpoint after ``to_empty`` (meta-device init).
        """
        self.rope.reset_parameters()
