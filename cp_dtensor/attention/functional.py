"""``document_attention``: SDPA with packed-document and sliding-window masks, for models to call.

Note [Document attention]
~~~~~~~~~~~~~~~~~~~~~~~~~
``F.scaled_dot_product_attention`` has no way to say "packed documents" or "sliding window" other than a
dense S x S mask, which CP cannot take. Models that need those masks call :func:`document_attention`
instead; it looks for an active CP mode on the torch-function mode stack (which torch.compile traces)::

    document_attention(q, k, v, document_ids=..., window_size=..., positions=...)
      no CP mode active   -> the exact masked op on one process (only visible pairs computed)
      inside a CP style   -> ContextParallelAttention.__torch_function__: q, k, v are local shards;
                             the layout is the style's ("balanced": balanced_layout(document_ids, ...)),
                             checked against ``positions`` (this rank's token positions), then the ring

Document ids and positions travel with the activations as model inputs, so activation checkpointing
recomputes with the same mask and pipeline schedules split them per microbatch like the tokens.
"""

from __future__ import annotations

import torch
from torch.overrides import _get_current_function_mode_stack

from cp_dtensor.attention.ring import ring_attention

__all__ = ["document_attention"]


def document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    document_ids: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    is_causal: bool = True,
    scale: float | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention where a query sees only keys of its own document and inside its window; differentiable.

    Args:
        query: (B, Hq, S, D) queries (under CP: this rank's shard; Hq a multiple of Hkv).
        key: (B, Hkv, S, D) keys.
        value: (B, Hkv, S, D) values.
        document_ids: (B, S_global) integer ids of packed documents, natural order (under CP: the whole
            sequence, the same on every rank); None: one document per row.
        window_size: ``(left, right)`` sliding window (flash-attn convention, -1 = unbounded).
        is_causal: causal masking inside a document.
        scale: softmax scale; default ``1 / sqrt(D)``.
        positions: (B, S) or (S,) global positions of the query tokens. Under CP they are checked against
            the CP layout (a batch sharded with another layout raises); without CP they must be natural.

    Returns:
        (B, Hq, S, D) the attention output (this rank's shard under CP).
    """
    for mode in reversed(_get_current_function_mode_stack()):  # innermost first; dynamo traces this
        if getattr(mode, "serves_document_attention", False):  # a ContextParallelAttention
            return mode._document_attention(
                query, key, value, document_ids=document_ids, window_size=window_size, is_causal=is_causal,
                scale=scale, positions=positions,
            )  # fmt: skip
    if positions is not None:
        natural = torch.arange(query.shape[2], device=positions.device)
        if not bool((positions == natural).all()):
            raise ValueError(
                "document_attention got permuted positions but no CP mode is active: without context "
                "parallelism the sequence must be in natural order (apply the ContextParallel style, or "
                "do not shard the batch)."
            )
    return ring_attention(
        query, key, value, None, is_causal=is_causal, scale=scale, document_ids=document_ids,
        window_size=window_size,
    )  # fmt: skip
