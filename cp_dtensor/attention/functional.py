"""``document_attention``: SDPA with packed-document and sliding-window masks, for models to call.

Note [Document attention]
~~~~~~~~~~~~~~~~~~~~~~~~~
``F.scaled_dot_product_attention`` has no way to say "packed documents" or "sliding window" other than a
dense S x S mask, which CP cannot take. Models that need those masks call :func:`document_attention`
instead. It is an *overridable* function, like the functions of ``torch.nn.functional``: when a torch
function mode is active it goes through ``torch.overrides.handle_torch_function``, so a
:class:`~cp_dtensor.ContextParallelAttention` mode (entered by the ``ContextParallel`` style) receives it in
its ``__torch_function__`` exactly as it receives SDPA - the documented mechanism of PyTorch, which
torch.compile traces::

    document_attention(q, k, v, document_ids=..., window_size=..., positions=...)
      no mode claims it  -> the exact masked op on one process (only visible pairs computed)
      inside a CP style  -> ContextParallelAttention.__torch_function__: q, k, v are local shards;
                            the layout is the settings' (a rule: applied to document_ids), checked
                            against ``positions`` (this rank's token positions), then CP attention

Document ids and positions travel with the activations as model inputs, so activation checkpointing
recomputes with the same mask and pipeline schedules split them per microbatch like the tokens.
"""

from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic

from cp_dtensor.attention.api import attend
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.settings import CPSettings

__all__ = ["document_attention"]

_ONE_PROCESS = CPSettings()  # no CP mode: one process, natural order


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
    layout_positions: torch.Tensor | None = None,
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
        layout_positions: (B, S_global) the batch's CP layout when it travels with the batch
            (``cp_dtensor.shard_batch`` adds it, Note [Travelling layout]): under CP the call uses it instead of
            the settings' layout or rule; without CP it is not needed.

    Returns:
        (B, Hq, S, D) the attention output (this rank's shard under CP).
    """
    if torch._C._is_torch_function_mode_enabled() or has_torch_function_variadic(query, key, value):
        return handle_torch_function(
            document_attention, (query, key, value), query, key, value, document_ids=document_ids,
            window_size=window_size, is_causal=is_causal, scale=scale, positions=positions,
            layout_positions=layout_positions,
        )  # fmt: skip
    if positions is not None and positions.shape[-1] != query.shape[2]:
        raise ValueError(
            f"document_attention got positions of shape {tuple(positions.shape)} for {query.shape[2]} query "
            f"tokens; pass (B, S) or (S,) positions of the query tokens."
        )
    if positions is not None:
        natural = torch.arange(query.shape[2], device=positions.device)
        if not bool((positions == natural).all()):
            raise ValueError(
                "document_attention got permuted positions but no CP mode is active: without context "
                "parallelism the sequence must be in natural order (apply the ContextParallel style, or "
                "do not shard the batch)."
            )
    mask = AttentionMask.build(is_causal, window_size, document_ids)
    return attend(query, key, value, None, settings=_ONE_PROCESS, mask=mask, scale=scale)
