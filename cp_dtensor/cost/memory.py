"""Activation memory of a decoder block, per token and per rank: the formula the trainer and the planner share.

Note [Activation memory]
~~~~~~~~~~~~~~~~~~~~~~~~
Bytes autograd keeps for backward, per token of a rank's CP shard (``B`` bytes per activation element,
``h`` model dim, ``kv`` = KV heads x head dim, ``f`` FFN width, TP degree ``t``)::

    norm  = B h                                    fused norm: its input only
          = (8 + (B if B < 4 else 0)) h + 4        unfused fp32 norm: fp32 input, normalized output (+ cast), 1/rms
    block = 2 norm / t                             two norms, sequence-sharded under sequence parallelism
          + 2 B h  (/ t when re-gathered)          the gathered inputs of the column-parallel linears
          + ((hq + 2 kv) B + hq B + 4 n_heads) / t  q, k, v, attention out, fp32 lse (hq = heads x head dim)
          + (4 | 2) f B / t                        SwiGLU | GELU MLP
    head  = norm / t + B h (/ t) + 4 vocab (/ t)   final norm, gathered head input, fp32 log-softmax

One step on one rank (``T`` tokens of the shard, ``L`` layers of this pp rank, ``R`` of them recomputed)::

    keep  = (L - R) block + R B h / t + in          a recomputed block keeps only its input; in = 8 + 4 hd
    work  = block if R > 0 else 0                  backward rebuilds one recomputed block at a time
    bytes = T (keep + head + work)                                  no pipeline
          = max(T f_pp keep, T / M (keep + head)) + T / M work      pp, M microbatches; the first stage
                                                                    holds f_pp = min(pp, M) / M (GPipe: 1)

Weights, gradients, optimizer state, temporaries and communication buffers are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "BlockShape",
    "MemoryFormat",
    "activation_bytes_per_rank",
    "block_activation_bytes_per_token",
    "head_activation_bytes_per_token",
    "norm_bytes_per_token",
    "recomputed_layers",
]


@dataclass(frozen=True)
class BlockShape:
    """The widths of one decoder block that its saved activations depend on.

    Attributes:
        dim: model dim.
        kv_dim: key/value heads x head dim.
        n_heads: query heads.
        head_dim: head dim (the RoPE table).
        ffn_hidden: MLP hidden width.
        vocab_size: vocabulary size (the head's log-softmax).
        swiglu: SwiGLU MLP (4 saved FFN-wide tensors) rather than a plain GELU MLP (2).
        dropout: the block keeps dropout masks (2 per token and dim).
        q_dim: query heads x head dim when it differs from ``dim`` (Qwen3); None: ``dim``.
    """

    dim: int
    kv_dim: int
    n_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    swiglu: bool = True
    dropout: bool = False
    q_dim: int | None = None


@dataclass(frozen=True)
class MemoryFormat:
    """How an implementation keeps activations.

    Attributes:
        dtype_bytes: bytes per activation element (2 for bf16).
        saves_gathered_input: column-parallel linears save their all-gathered input (DTensor TP); False:
            the sequence-parallel shard, re-gathered in backward (Megatron).
        fused_norm: norms keep only their input; False: the unfused fp32 norm (see the Note).
        loss_parallel: vocab-parallel cross entropy (logits sharded over tp).
    """

    dtype_bytes: int = 2
    saves_gathered_input: bool = False
    fused_norm: bool = True
    loss_parallel: bool = True


def norm_bytes_per_token(dim: int, fmt: MemoryFormat) -> float:
    """Bytes one norm keeps per token (Note [Activation memory])."""
    b = fmt.dtype_bytes
    if fmt.fused_norm:
        return float(b * dim)
    return float((8 + (b if b < 4 else 0)) * dim + 4)


def block_activation_bytes_per_token(shape: BlockShape, fmt: MemoryFormat, tp: int = 1) -> float:
    """Bytes one block keeps per token of the CP shard on one TP rank, without checkpointing."""
    h, b = shape.dim, fmt.dtype_bytes
    seq_sharded = 2 * norm_bytes_per_token(h, fmt) + (2 * h if shape.dropout else 0)
    gathered = 2 * h * b
    hq = shape.q_dim or h
    head_sharded = (hq + 2 * shape.kv_dim) * b + hq * b + 4 * shape.n_heads
    head_sharded += (4 if shape.swiglu else 2) * shape.ffn_hidden * b
    return seq_sharded / tp + (gathered if fmt.saves_gathered_input else gathered / tp) + head_sharded / tp


def head_activation_bytes_per_token(shape: BlockShape, fmt: MemoryFormat, tp: int = 1) -> float:
    """Final norm, gathered head input and fp32 log-softmax per token (the last stage)."""
    h, b = shape.dim, fmt.dtype_bytes
    norm = norm_bytes_per_token(h, fmt) / tp
    gathered = h * b if fmt.saves_gathered_input else h * b / tp
    vocab = shape.vocab_size / tp if fmt.loss_parallel else shape.vocab_size
    return norm + gathered + 4.0 * vocab


def activation_bytes_per_rank(
    shape: BlockShape,
    fmt: MemoryFormat,
    *,
    tokens: float,
    layers: int,
    recomputed: int,
    tp: int = 1,
    pp: int = 1,
    microbatches: int = 1,
    in_flight: int = 1,
) -> float:
    """Bytes one rank keeps for backward at the peak of one step (Note [Activation memory]).

    Args:
        shape, fmt: the block and how it keeps activations.
        tokens: tokens of this rank's CP shard in one accumulation step (batch x seq_len / cp).
        layers: blocks on this pp rank; ``recomputed`` of them activation-checkpointed.
        tp: TP degree.
        pp: pipeline degree; with pp > 1, ``microbatches`` per step of which ``in_flight`` are alive on
            the first stage at once.
    """
    block = block_activation_bytes_per_token(shape, fmt, tp)
    keep = (
        (layers - recomputed) * block + recomputed * fmt.dtype_bytes * shape.dim / tp + 8 + 4 * shape.head_dim
    )
    work = block if recomputed else 0.0
    head = head_activation_bytes_per_token(shape, fmt, tp)
    if pp == 1:
        return tokens * (keep + head + work)
    m = microbatches
    return max(tokens * in_flight / m * keep, tokens / m * (keep + head)) + tokens / m * work


def recomputed_layers(layers: int, mode: str, every: int = 2) -> int:
    """How many of ``layers`` blocks activation checkpointing recomputes (``none``, ``full``, ``selective``
    every ``every``-th block)."""
    if mode == "full":
        return layers
    if mode == "selective":
        return math.ceil(layers / every)
    return 0
