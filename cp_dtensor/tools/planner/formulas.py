"""The cost model's closed-form terms: FLOPs, bytes, pipeline bubble, collective times.

They are the formulas of Note [Cost model] in ``step_estimate.py``. Each function prices one quantity
of one layer or one collective; :func:`~.step_estimate.estimate` adds them up for a whole training step.
"""

from __future__ import annotations

from cp_dtensor.cost import memory as cost_memory
from cp_dtensor.cost.memory import BlockShape, MemoryFormat
from cp_dtensor.models.llama import training_flops_per_token
from cp_dtensor.tools.planner.options import CostOptions
from cp_dtensor.tools.planner.shapes import ModelShape

__all__ = [
    "activation_bytes_per_token_layer",
    "attention_flops",
    "attention_pairs",
    "causal_fraction",
    "collective_time",
    "cp_comm_bytes",
    "head_activation_bytes_per_token",
    "kv_heads_per_rank",
    "memory_format",
    "memory_shape",
    "model_flops_per_token",
    "norm_bytes_per_token",
    "pp_bubble_fraction",
    "ring_transient_bytes",
]


def attention_pairs(seq_len: int, cp: int = 1, *, causal: bool = True, cp_layout: str = "zigzag") -> float:
    """Query-key pairs the busiest CP rank computes for one sequence (all heads count once).

    Args:
        seq_len: Global sequence length ``S``.
        cp: CP degree.
        causal: Causal mask (lower triangle, ``S^2/2`` pairs in total) or bidirectional (``S^2``).
        cp_layout: ``"zigzag"``: every rank does exactly ``1/cp`` of the work; ``"contiguous"``: the last
            rank does ``(2cp-1)/(2cp^2) S^2``.

    Returns:
        Pairs on the critical path.
    """
    s2 = float(seq_len) ** 2
    if not causal:
        return s2 / cp
    if cp_layout == "zigzag" or cp == 1:
        return s2 / (2 * cp)
    return s2 * (2 * cp - 1) / (2 * cp * cp)


def causal_fraction(cp: int = 1, *, causal: bool = True, cp_layout: str = "zigzag") -> float:
    """Part of the busiest rank's visible pairs (:func:`attention_pairs`) computed by causal kernel calls.

    The ring's diagonal step (a rank's own K/V, ``(S/c)^2 / 2`` pairs) is the only masked call; every other
    step is an unmasked block. Zigzag: ``1/c`` of the rank's ``S^2/(2c)``; contiguous, last rank:
    ``1/(2c-1)``; one rank: all of it; bidirectional: none.

    Args:
        cp: CP degree.
        causal: Causal attention.
        cp_layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        The fraction in [0, 1].
    """
    if not causal:
        return 0.0
    if cp == 1:
        return 1.0
    return 1.0 / cp if cp_layout == "zigzag" else 1.0 / (2 * cp - 1)


def attention_flops(
    model: ModelShape,
    seq_len: int,
    *,
    cp: int = 1,
    tp: int = 1,
    micro_batch: int = 1,
    causal: bool | None = None,
    cp_layout: str = "zigzag",
) -> float:
    """Forward FLOPs of ``QK^T`` and ``PV`` of one layer on the busiest rank: ``4 * b * hd * a/tp * pairs``.

    Args:
        model: Model shape.
        seq_len: Global sequence length.
        cp: CP degree.
        tp: TP degree (splits the heads).
        micro_batch: Sequences per micro-batch.
        causal: Override ``model.causal``.
        cp_layout: ``"zigzag"`` or ``"contiguous"`` (:func:`attention_pairs`).

    Returns:
        FLOPs.
    """
    is_causal = model.causal if causal is None else causal
    pairs = attention_pairs(seq_len, cp, causal=is_causal, cp_layout=cp_layout)
    return 4.0 * micro_batch * model.head_dim * (model.n_heads / tp) * pairs


def model_flops_per_token(model: ModelShape, seq_len: int) -> float:
    """Useful training FLOPs per token for MFU, by ``cp_dtensor.models.llama.training_flops_per_token``.

    ``6 * (L * W + h * V) + 0.5 * 12 * L * h * S`` (causal); for a Llama flavor this equals
    ``cp_dtensor.models.llama.model_flops_per_token``.
    """
    return training_flops_per_token(
        matmul_params=model.matmul_params,
        n_layers=model.n_layers,
        attention_dim=model.n_heads * model.head_dim,
        seq_len=seq_len,
        causal=model.causal,
    )


def kv_heads_per_rank(model: ModelShape, tp: int) -> int:
    """KV heads each TP rank holds (replicated when there are fewer KV heads than tp ranks)."""
    return max(1, model.n_kv_heads // tp)


def cp_comm_bytes(
    model: ModelShape,
    seq_len: int,
    cp: int,
    *,
    tp: int = 1,
    micro_batch: int = 1,
    dtype_bytes: int = 2,
    grad_bytes: int = 4,
) -> tuple[float, float]:
    """Bytes one rank sends in the CP ring for one layer: ``(forward, backward)``.

    Forward: ``(cp-1) * 2 * b*S/cp * g/tp * hd * B`` (K and V of the KV heads only). Backward: K, V again
    plus the dK, dV accumulators in ``grad_bytes``: ``(cp-1) * 2 * b*S/cp * g/tp * hd * (B + Bg)``.

    Args:
        model: Model shape.
        seq_len: Global sequence length.
        cp: CP degree.
        tp: TP degree (splits the KV heads).
        micro_batch: Sequences per micro-batch.
        dtype_bytes: ``B``, bytes of K and V.
        grad_bytes: ``Bg``, bytes of the dK, dV accumulators.

    Returns:
        ``(forward, backward)`` bytes.
    """
    if cp == 1:
        return 0.0, 0.0
    elems = 2.0 * micro_batch * seq_len / cp * kv_heads_per_rank(model, tp) * model.head_dim
    return (cp - 1) * elems * dtype_bytes, (cp - 1) * elems * (dtype_bytes + grad_bytes)


# Peak bytes the ring allocates inside one attention call per rank, in units of the local K+V bytes
# (Note [Ring transient memory]): (forward, backward) at cp = 2 and at cp >= 3.
RING_TRANSIENT_KV_MULTIPLES: dict[str, tuple[float, float]] = {"cp2": (3.0, 7.0), "cp3+": (3.6, 8.0)}


def ring_transient_bytes(
    model: ModelShape, seq_len: int, cp: int, *, tp: int = 1, micro_batch: int = 1, dtype_bytes: int = 2
) -> tuple[float, float]:
    """Transient bytes of one attention layer's ring on one rank: ``(forward peak, backward peak)``.

    Note [Ring transient memory]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    Besides what autograd saves, the ring allocates buffers while one attention call runs: the K/V blocks
    in flight (received and being sent), the partial outputs and lse of the merge, in backward the dK/dV
    accumulators travelling the ring and the local dQ, dK, dV. They are freed when the call returns, so
    only one layer's ring is live at a time::

        kv_local  = 2 * b * S/c * (g/t) * hd * B            local K + V bytes of one rank
        forward   = m_f(c) * kv_local,  m_f = 3.0 (c = 2), 3.6 (c >= 3)
        backward  = m_b(c) * kv_local,  m_b = 7.0 (c = 2), 8.0 (c >= 3);  0 for c = 1 (no ring)

    The multiples are peaks of live bytes allocated inside the call (inputs excluded) measured by
    ``scripts/ring_memory.py`` (the live-bytes tracker; unmasked zigzag ring, p2p, fp32 K/V, B=1, H=8,
    S_local=256, D=64): flat in c from c = 4 on since the dK/dV send window fix (c = 3 is priced as 4).
    The unit hides query-sized buffers (output, dQ, partial outputs), which were measured with as many
    query as KV heads and in fp32 only: with GQA (``g < a``) or bf16 K/V with fp32 accumulators those
    buffers are larger relative to ``kv_local``, so there the multiples are a lower bound (not measured).

    Args:
        model: Model shape.
        seq_len: Global sequence length.
        cp: CP degree.
        tp: TP degree (splits the KV heads).
        micro_batch: Sequences per micro-batch.
        dtype_bytes: ``B``, bytes of K and V.

    Returns:
        ``(forward, backward)`` peak bytes of one layer's ring.
    """
    if cp == 1:
        return 0.0, 0.0
    kv_local = 2.0 * micro_batch * seq_len / cp * kv_heads_per_rank(model, tp) * model.head_dim * dtype_bytes
    m_f, m_b = RING_TRANSIENT_KV_MULTIPLES["cp2" if cp == 2 else "cp3+"]
    return m_f * kv_local, m_b * kv_local


def pp_bubble_fraction(pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a 1F1B (or GPipe) step: ``(pp - 1) / (v * microbatches + pp - 1)``.

    Args:
        pp: Pipeline-parallel degree.
        microbatches: Micro-batches per step.
        stages_per_rank: ``v``, stages each rank holds; an interleaved schedule divides the bubble by it
            (Narayanan et al. 2021).

    Returns:
        The fraction of the step.
    """
    if pp < 1 or microbatches < 1 or stages_per_rank < 1:
        raise ValueError(
            f"pp, microbatches and stages_per_rank must be >= 1, got pp={pp}, microbatches={microbatches}, "
            f"stages_per_rank={stages_per_rank}"
        )
    return (pp - 1) / (stages_per_rank * microbatches + pp - 1)


def collective_time(size_bytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-gather or reduce-scatter of a ``size_bytes`` tensor over ``n`` ranks.

    ``(n-1)/n * size / bandwidth + (n-1) * latency``; 0 for one rank or an empty tensor.
    """
    if n <= 1 or size_bytes <= 0:
        return 0.0
    return (n - 1) / n * size_bytes / bandwidth + (n - 1) * latency


def memory_shape(model: ModelShape) -> BlockShape:
    """The library's :class:`~cp_dtensor.cost.memory.BlockShape` of ``model``."""
    return BlockShape(
        dim=model.dim, kv_dim=model.kv_dim, n_heads=model.n_heads, head_dim=model.head_dim,
        ffn_hidden=model.ffn_hidden, vocab_size=model.vocab_size, swiglu=model.mlp == "swiglu",
        dropout=model.dropout, q_dim=model.q_dim,
    )  # fmt: skip


def memory_format(options: CostOptions) -> MemoryFormat:
    """The library's :class:`~cp_dtensor.cost.memory.MemoryFormat` of ``options``."""
    return MemoryFormat(
        dtype_bytes=options.dtype_bytes, saves_gathered_input=options.saves_gathered_input,
        fused_norm=options.fused_norm, loss_parallel=options.loss_parallel,
    )  # fmt: skip


def norm_bytes_per_token(model: ModelShape, options: CostOptions) -> float:
    """Bytes per token one norm keeps for backward (Note [Activation memory] in ``cp_dtensor.cost.memory``)."""
    return cost_memory.norm_bytes_per_token(model.dim, memory_format(options))


def activation_bytes_per_token_layer(
    model: ModelShape, tp: int = 1, options: CostOptions | None = None
) -> float:
    """Bytes one block keeps for backward per token of the CP shard, on one TP rank (no checkpointing).

    The library's formula (Note [Activation memory] in ``cp_dtensor.cost.memory``), shared with the
    trainer's memory check.

    Args:
        model: Model shape.
        tp: TP degree.
        options: Implementation choices (default :class:`CostOptions`).

    Returns:
        Bytes per token.
    """
    opt = options or CostOptions()
    return cost_memory.block_activation_bytes_per_token(memory_shape(model), memory_format(opt), tp)


def head_activation_bytes_per_token(model: ModelShape, tp: int, options: CostOptions) -> float:
    """Final norm, gathered head input and fp32 log-softmax per token (last stage)."""
    return cost_memory.head_activation_bytes_per_token(memory_shape(model), memory_format(options), tp)
