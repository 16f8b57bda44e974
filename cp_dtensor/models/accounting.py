"""Parameter and FLOP accounting of the Llama-style decoder: the one home of the MFU formula."""

from __future__ import annotations

from torch import nn

from cp_dtensor.models.args import ModelArgs

__all__ = ["count_params", "matmul_param_count", "model_flops_per_token", "training_flops_per_token"]


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


def matmul_param_count(args: ModelArgs) -> int:
    """Parameters that take part in a matmul per token: all linear layers incl. `output`, not embeddings/norms.

    Args:
        args: Model shape.

    Returns:
        The count `N` of :func:`training_flops_per_token`.
    """
    dim, hidden = args.dim, args.ffn_hidden_dim
    per_layer = 2 * dim * args.q_dim + 2 * dim * args.kv_dim + 3 * dim * hidden  # wq, wo, wk, wv, w1, w2, w3
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
        matmul_params=matmul_param_count(args),
        n_layers=args.n_layers,
        attention_dim=args.n_heads * args.head_dim,
        seq_len=seq_len,
        causal=args.causal if causal is None else causal,
    )
