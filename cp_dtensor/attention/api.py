"""The CP attention entry points: :func:`attend` (eager or compiled, decided once) and :func:`ring_attention`.

:func:`attend` is the only place that chooses how a call runs::

    attend(q, k, v, group, settings, mask, scale, stats, token_positions)
      one rank, no mask, no layout rule  -> F.scaled_dot_product_attention (nothing to parallelize)
      under torch.compile                -> the custom ops (Note [Compiled CP attention])
      otherwise                          -> build_call(...) + the eager autograd function

Everything above it (the public function, the mode, the styles, ``document_attention``) hands over one
:class:`~cp_dtensor.attention.settings.CPSettings` and one :class:`~cp_dtensor.attention.mask.AttentionMask`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from cp_dtensor.attention.call import CPAttentionCall, build_call, validate_call_inputs
from cp_dtensor.attention.custom_ops import compiled_attention
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.strategy import AUTO
from cp_dtensor.layout import LayoutLike, LayoutRule, cached_sequence_layout

__all__ = ["attend", "local_document_ids", "process_group_of", "ring_attention"]


class _EagerCPAttention(torch.autograd.Function):
    """Autograd wrapper of one :class:`CPAttentionCall`: saves only local q, k, v, out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, call: CPAttentionCall):
        out, lse = call.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # create_graph=True: the ring's backward is not itself differentiable
            raise RuntimeError(
                "cp_dtensor CP attention does not support double backward (create_graph=True, e.g. a "
                "gradient penalty): its backward is a hand-written ring, not a differentiable graph."
            )
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.call.backward(dout.contiguous(), q, k, v, out, lse)
        return dq, dk, dv, None


def process_group_of(mesh: DeviceMesh | dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The CP process group of a 1-D CP mesh (or the group itself); None for one process."""
    if mesh is None:
        return None
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(
                f"CP attention needs a 1-D CP mesh, got axes {mesh.mesh_dim_names}; pass e.g. world_mesh['cp']."
            )
        return mesh.get_group()
    return mesh


def local_document_ids(document_ids: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's rows of ``document_ids`` as a plain tensor: a DTensor (``shard_batch`` makes one: rows over
    dp, the whole sequence on every CP rank) becomes its local tensor; one split along the sequence raises."""
    if not isinstance(document_ids, DTensor):
        return document_ids
    names = document_ids.device_mesh.mesh_dim_names or ()
    for axis, placement in enumerate(document_ids.placements):
        sharded_seq = (
            not isinstance(placement, Replicate) and getattr(placement, "dim", 0) % document_ids.ndim != 0
        )
        if sharded_seq:
            raise ValueError(
                f"document_ids is a DTensor split along the sequence over mesh axis "
                f"{names[axis] if names else axis!r} ({document_ids.placements}); CP attention needs every "
                f"row's whole sequence on every CP rank (shard_batch keeps document_ids whole: Replicate on 'cp')."
            )
    return document_ids.to_local()


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    settings: CPSettings,
    mask: AttentionMask,
    scale: float | None = None,
    token_positions: torch.Tensor | None = None,
    default_layout: str = "zigzag",
    layout_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """CP attention of local shards with ``settings`` and ``mask``: eager or compiled, decided here.

    Args:
        q, k, v: (B, Hq | Hkv, S_local, D) this rank's shards in the call's layout.
        group: the CP process group; None (or size 1) for one process.
        settings: layout, strategy, backend, stats.
        mask: causal / documents / window.
        scale: softmax scale; default ``1 / sqrt(D)``.
        token_positions: this rank's query positions, checked against the layout (optional).
        default_layout: the layout when ``settings.layout`` is None.
        layout_positions: (B, S) the batch's layout, travelling with it (Note [Travelling layout]): used
            instead of ``settings.layout``.

    Returns:
        (B, Hq, S_local, D) this rank's output shard.
    """
    cp = 1 if group is None else dist.get_world_size(group)
    plain = mask.is_plain and not isinstance(settings.layout, LayoutRule)
    if cp == 1:
        layout_positions = None  # one rank: natural order whatever the layout
    if cp == 1 and plain and token_positions is None:
        comm = "p2p" if settings.comm == AUTO else settings.comm
        validate_call_inputs(
            q, k, v, layout="contiguous", comm=comm, cp=1, mask=mask, a2a_size=settings.a2a_size
        )
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=mask.is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    if torch.compiler.is_compiling():
        return compiled_attention(
            q, k, v, group, settings=settings, mask=mask, scale=scale, token_positions=token_positions,
            default_layout=default_layout, layout_positions=layout_positions,
        )  # fmt: skip
    layout = None if layout_positions is None else cached_sequence_layout(layout_positions, cp)
    call = build_call(
        q, k, v, group, settings=settings, mask=mask, scale=scale, token_positions=token_positions,
        default_layout=default_layout, layout=layout,
    )  # fmt: skip
    if q.shape[2] == 0:  # an empty sequence on every rank (checked above): an empty result, like SDPA
        return q * 0.0 + (k.sum() + v.sum()) * 0.0  # (B, Hq, 0, D), differentiable
    return _EagerCPAttention.apply(q, k, v, call)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mesh: DeviceMesh | dist.ProcessGroup | None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    layout: LayoutLike | LayoutRule = "zigzag",
    comm: str = "p2p",
    document_ids: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
    stats: AttentionStats | None = None,
    a2a_size: int | None = None,
    settings: CPSettings | None = None,
    mask: AttentionMask | None = None,
) -> torch.Tensor:
    """Context-parallel scaled dot-product attention on local sequence shards; differentiable.

    Equals ``F.scaled_dot_product_attention`` on the full sequence (GQA expanded) with the mask below,
    sharded by ``layout``. Whatever the strategy - ring, all-gather, all-to-all or hybrid - this is the
    one CP attention call (Note [One CP attention call]).

    Args:
        q: (B, Hq, S_local, D) this rank's queries, in ``layout`` order (see :func:`cp_dtensor.shard_sequence`).
        k: (B, Hkv, S_local, D) this rank's keys; ``Hq % Hkv == 0`` (MHA, GQA, MQA).
        v: (B, Hkv, S_local, D) this rank's values.
        mesh: the 1-D CP ``DeviceMesh`` (or its ``ProcessGroup``); ``None`` or size 1 means one process.
        is_causal: causal (decoder) masking over global positions; otherwise bidirectional.
        scale: softmax scale; default ``1 / sqrt(D)``.
        layout: ``"zigzag"`` (load-balanced causal), ``"contiguous"``, a layout object from
            :func:`cp_dtensor.balanced_layout`, or a :class:`cp_dtensor.BalancedLayoutRule`.
        comm: ``"p2p"`` (ring of isend/irecv, overlapped), ``"allgather"`` (gather KV once),
            ``"alltoall"`` (Ulysses: all-to-all to head shards of the whole sequence and back; the local
            query heads must be a multiple of cp and the KV heads divide cp or be a multiple of it),
            ``"hybrid"`` (all-to-all inside groups of ``a2a_size`` consecutive ranks, the ring across
            groups; the same head rule with ``a2a_size`` in place of cp), any strategy registered with
            :func:`cp_dtensor.register_strategy`, or ``"auto"``: the cost model picks one of them (and
            the group size) per call shape (:func:`cp_dtensor.choose_comm`).
        document_ids: (B, S) integer ids of packed documents for the *global* sequence in natural order,
            identical on every rank; a query sees only keys of its own document. Documents are contiguous.
        window_size: ``(left, right)``: key j is visible from query i only if ``i - left <= j <= i + right``
            (flash-attn's convention); -1 = unbounded.
        backend: kernel adapter name (``cpu_flash``, ``flash``, ``cudnn``, ``efficient``, ``math``);
            default from device and dtype.
        stats: optional :class:`cp_dtensor.AttentionStats` to accumulate bytes sent and work done here.
        a2a_size: ranks per all-to-all group for ``comm="hybrid"`` (required there; must divide the CP
            degree); None otherwise.
        settings: a :class:`cp_dtensor.CPSettings` instead of ``layout``, ``comm``, ``backend``,
            ``stats`` and ``a2a_size`` (those keywords must then keep their defaults).
        mask: a :class:`cp_dtensor.AttentionMask` (causal, document ids, window as one value) instead of
            ``is_causal``, ``document_ids`` and ``window_size`` (those must then keep their defaults).

    With documents or a window, only visible pairs are computed and only KV rows some query needs are
    sent (Note [Ring plan]). With one process and no mask this is one ``F.scaled_dot_product_attention``.

    Returns:
        (B, Hq, S_local, D) this rank's attention output shard.
    """
    if settings is None:
        settings = CPSettings(layout=layout, comm=comm, a2a_size=a2a_size, backend=backend, stats=stats)
    elif (layout, comm, backend, stats, a2a_size) != ("zigzag", "p2p", None, None, None):
        raise ValueError(
            "ring_attention got settings= and also layout/comm/backend/stats/a2a_size keywords; pass one or "
            "the other (settings.with_options(...) changes a field)."
        )
    if mask is None:
        mask = AttentionMask.build(is_causal, window_size, local_document_ids(document_ids))
    elif (is_causal, document_ids, tuple(window_size)) != (False, None, (-1, -1)):
        raise ValueError(
            "ring_attention got mask= and also is_causal/document_ids/window_size keywords; pass one or the other."
        )
    else:
        mask = AttentionMask.build(mask.is_causal, mask.window, local_document_ids(mask.document_ids))
    return attend(q, k, v, process_group_of(mesh), settings=settings, mask=mask, scale=scale)
