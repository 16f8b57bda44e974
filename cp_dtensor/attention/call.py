"""One CP attention call: validated, resolved and planned once, then run forward and backward.

Note [One CP attention call]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every path to the kernels goes through :func:`build_call`, which returns a frozen :class:`CPAttentionCall`::

    q, k, v (local shards), group or transport, CPSettings, AttentionMask, scale
      -> layout      the settings' layout; a rule applied to the call's document ids (Note [Rule memo]);
                     one rank (cp = 1): natural order, whatever the layout
      -> strategy    settings.comm, or the cost model's choice for "auto" (cp_dtensor.attention.choice)
      -> validate    shapes, dtypes, mask, layout, the strategy's own head / group-size rule, positions
      -> check       the same call on every rank (Note [Cross-rank call check]), before any transfer
      -> kernel      the adapter for device, dtype and backend; packed or per-piece steps (Note [Piece packing])
      -> algorithm   the strategy's plan for this rank (Note [Strategy registry])
    CPAttentionCall.forward(q, k, v) -> (out, lse);  .backward(dout, q, k, v, out, lse) -> (dq, dk, dv)

The three ways in are thin wrappers over it: the eager autograd function (``cp_dtensor.attention.api``),
the ``torch.library`` custom ops that ``torch.compile`` sees (``custom_ops``), and the single-process
simulation of every rank (``simulate``). Eager versus compiled is decided in one place
(:func:`cp_dtensor.attention.api.attend`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cp_dtensor.attention.choice import resolve_comm
from cp_dtensor.attention.consistency import CallSignature, verify_call_across_ranks
from cp_dtensor.attention.kernels import AttentionKernel, select_kernel
from cp_dtensor.attention.mask import AttentionMask, validate_mask_inputs
from cp_dtensor.attention.packing import apply_piece_packing
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.strategy import Algorithm, get_strategy
from cp_dtensor.attention.transport import ProcessGroupTransport, Transport, single_rank_transport
from cp_dtensor.layout import (
    LayoutLike,
    LayoutRule,
    SequenceLayout,
    check_rank_positions,
    chunks_per_rank,
    validate_layout,
    validate_seq_len,
)

__all__ = ["CPAttentionCall", "build_call", "call_layout", "validate_call_inputs"]


@dataclass(frozen=True, eq=False)
class CPAttentionCall:
    """A resolved CP attention call on one rank (Note [One CP attention call]).

    Attributes:
        transport: how this rank reaches the others.
        comm, a2a_size: the strategy that runs (``auto`` resolved) and its group size.
        layout: the concrete layout of the shards.
        algorithm: the strategy's forward / backward and plan for this rank.
        stats: counters to fill, or None.
    """

    transport: Transport
    comm: str
    a2a_size: int | None
    layout: LayoutLike
    algorithm: Algorithm
    stats: AttentionStats | None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``: out like q; lse fp32 with B x Hq x S_local elements, shaped (B, Hq, S_local)."""
        sent = self.transport.bytes_sent
        algo = self.algorithm
        out, lse = algo.forward(q, k, v, self.transport, stats=self.stats, **algo.options)
        if self.stats is not None:
            self.stats.bytes_sent_forward += self.transport.bytes_sent - sent
        return out, lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` like q, k, v, given the forward's ``out`` and ``lse``."""
        sent = self.transport.bytes_sent
        algo = self.algorithm
        dq, dk, dv = algo.backward(dout, q, k, v, out, lse, self.transport, stats=self.stats, **algo.options)
        if self.stats is not None:
            self.stats.bytes_sent_backward += self.transport.bytes_sent - sent
        return dq, dk, dv


def call_layout(
    layout: LayoutLike | LayoutRule | None,
    document_ids: torch.Tensor | None,
    cp: int,
    *,
    default: str = "zigzag",
) -> LayoutLike:
    """The concrete layout of one call: ``layout`` itself, ``default`` for None, or a rule applied to the
    call's document ids; with one rank, natural order whatever the layout (nothing is sharded)."""
    if cp == 1:
        return "contiguous"
    if layout is None:
        return default
    if isinstance(layout, LayoutRule):
        if document_ids is None:
            raise ValueError(
                f"The CP layout rule {layout!r} derives each batch's layout from its document ids, but the "
                f"attention call passed none: call cp_dtensor.document_attention(..., document_ids=...) (plain "
                f"F.scaled_dot_product_attention carries no document ids), or use a fixed layout."
            )
        return layout(document_ids, cp)
    return layout


def validate_call_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: LayoutLike,
    comm: str,
    cp: int,
    mask: AttentionMask,
    a2a_size: int | None = None,
) -> None:
    """Check shapes, dtypes, layout, strategy and mask of local shards; ``ValueError`` naming the problem."""
    validate_layout(layout)
    strategy = get_strategy(comm)
    problem = strategy.check_group_size(a2a_size, cp)
    if problem:
        raise ValueError(problem)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, S_local, D), got shape {tuple(getattr(t, 'shape', ()))}."
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, local sequence length "
            f"and head dim (B, _, S_local, D); CP attention is self-attention over one sharded sequence."
        )
    if k.shape[1] == 0 or q.shape[1] == 0:
        raise ValueError(
            f"This rank holds {q.shape[1]} query heads and {k.shape[1]} key/value heads: each rank needs at "
            f"least one of each. When heads are sharded over another mesh axis (e.g. tp), its size must divide "
            f"both head counts (replicate the KV heads instead, or use a smaller tp)."
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"The number of query heads ({q.shape[1]}) must be a multiple of the number of key/value heads "
            f"({k.shape[1]}) for MHA/GQA/MQA."
        )
    problem = strategy.check(q.shape[1], k.shape[1], cp, a2a_size)
    if problem:
        raise ValueError(problem)
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    per_rank = chunks_per_rank(layout)
    if q.shape[2] % per_rank != 0:
        raise ValueError(
            f"Local sequence length {q.shape[2]} must be a multiple of {per_rank} for layout {layout!r} "
            f"(each rank holds {per_rank} chunks of equal length)."
        )
    if isinstance(layout, SequenceLayout):
        validate_seq_len(q.shape[2] * cp, cp, layout)
        if layout.batch != q.shape[0]:
            raise ValueError(
                f"{layout!r} was built for {layout.batch} batch rows but q has {q.shape[0]}; build the layout "
                f"from this batch's document_ids."
            )
    validate_mask_inputs(mask.document_ids, mask.window, batch=q.shape[0], seq_len=q.shape[2] * cp)


def _layout_key(layout: LayoutLike) -> str:
    return layout if isinstance(layout, str) else f"{layout.name}:{layout.digest}"


def build_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | Transport | None,
    *,
    settings: CPSettings,
    mask: AttentionMask,
    scale: float | None = None,
    token_positions: torch.Tensor | None = None,
    default_layout: str = "zigzag",
    check: bool = True,
    layout: LayoutLike | None = None,
) -> CPAttentionCall:
    """Resolve, validate, check across ranks and plan one call (Note [One CP attention call]).

    Args:
        q, k, v: this rank's shards (B, Hq | Hkv, S_local, D).
        group: the CP process group, a transport (the simulation's threads), or None for one process.
        settings: layout, strategy, backend.
        mask: causal / documents / window.
        scale: softmax scale; default ``1 / sqrt(D)``.
        token_positions: (B, S_local) or (S_local,) global positions of the query tokens, checked against
            the layout (a batch sharded with another layout raises).
        default_layout: the layout when ``settings.layout`` is None.
        check: run the cross-rank check (False only to replay a call its forward verified, in backward).
        layout: the call's layout when it travels with the batch (Note [Travelling layout]); None: the
            settings'.

    Raises:
        ValueError: on every rank of the group, naming the first problem (Note [Cross-rank call check]).
    """
    if isinstance(group, Transport):
        transport, process_group = group, None
    elif group is None or dist.get_world_size(group) == 1:
        transport, process_group = single_rank_transport(), None
    else:
        transport, process_group = ProcessGroupTransport(group), group
    cp, rank = transport.size, transport.rank
    error: ValueError | None = None
    given, layout = layout, "contiguous"
    comm, a2a_size = settings.comm, settings.a2a_size
    try:
        layout = call_layout(
            given if given is not None else settings.layout, mask.document_ids, cp, default=default_layout
        )
        comm, a2a_size = resolve_comm(comm, a2a_size, q, k, cp, mask.is_causal, settings.cost_hardware)
        validate_call_inputs(q, k, v, layout=layout, comm=comm, cp=cp, mask=mask, a2a_size=a2a_size)
        if token_positions is not None:
            check_rank_positions(token_positions, layout, rank, cp)
    except ValueError as e:
        error = e
    if process_group is not None and check:
        signature = CallSignature.of(
            q, k, v, layout=_layout_key(layout), is_causal=mask.is_causal, comm=comm, scale=scale,
            backend=settings.backend, mask=mask.fingerprint(), a2a_size=a2a_size,
        )  # fmt: skip
        verify_call_across_ranks(process_group, signature, error, q.device)
    if error is not None:
        raise error
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kernel: AttentionKernel = apply_piece_packing(
        select_kernel(q.device, q.dtype, settings.backend), settings.piece_packing
    )
    algorithm = get_strategy(comm).build(
        layout=layout, mask=mask, rank=rank, cp=cp, s_local=q.shape[2], a2a_size=a2a_size, scale=scale,
        kernel=kernel,
    )  # fmt: skip
    return CPAttentionCall(transport, comm, a2a_size, layout, algorithm, settings.stats)
