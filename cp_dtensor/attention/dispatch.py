"""DTensor dispatch: ``F.scaled_dot_product_attention`` on sequence-sharded DTensors runs the ring op.

Note [SDPA dispatch]
~~~~~~~~~~~~~~~~~~~~
A :class:`ContextParallelAttention` object is a ``TorchFunctionMode`` that the caller holds and enters
(``with cp_attention: ...``), or that the :class:`~cp_dtensor.styles.ContextParallel` style enters around
one module's forward. While it is active, SDPA calls take one of two paths::

    F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=..., enable_gqa=...)

    (a) q, k, v DTensors, Shard(2) on the "cp" mesh axis  (other axes: Replicate / Shard(0) / Shard(1))
          |  to_local(): (B, Hq_local, S_local, D), no communication
          |  attend(..., layout=settings.layout or "contiguous")       the global view is the order
          v                                                            of the shards: natural order
        DTensor out, q's placements

    (b) q, k, v plain tensors, the mode holds a CP mesh (the ContextParallel style's case)
          |  they are this rank's local shards, in the settings' layout (default "zigzag")
          |  attend(q, k, v, cp group, settings, mask)
          v
        local out (B, Hq_local, S_local, D)

    cp_dtensor.document_attention(q, k, v, document_ids=..., window_size=..., positions=...)
        an overridable function (torch.overrides.handle_torch_function): inside the mode it reaches
        __torch_function__ like SDPA and runs as (b) with the call's documents, window and positions
        (Note [Document attention]); dynamo traces it like any torch function

    plain tensors and no mesh: ValueError (a shard must never be attended as if it were the sequence)

DTensors that are not sequence-sharded on the CP axis pass through to DTensor's own SDPA. Nothing is
global: mesh and :class:`~cp_dtensor.attention.settings.CPSettings` live on the object, and
``F.scaled_dot_product_attention`` is never patched. Calls that CP cannot serve exactly (an explicit ``attn_mask``, dropout) raise instead of
gathering.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.overrides import TorchFunctionMode

from cp_dtensor.attention.api import attend, local_document_ids
from cp_dtensor.attention.functional import document_attention
from cp_dtensor.attention.mask import AttentionMask, validate_mask_inputs
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.layout import LayoutLike, LayoutRule

__all__ = ["ContextParallelAttention", "context_parallel_sdpa"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS: dict[str, Any] = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def _is_seq_shard(p: Any) -> bool:
    return isinstance(p, Shard) and p.dim in (2, -2)


def _cp_axis_index(x: DTensor, cp_axis: str) -> int | None:
    names = x.device_mesh.mesh_dim_names or ()
    return names.index(cp_axis) if cp_axis in names else None


def context_parallel_sdpa(
    query: DTensor,
    key: DTensor,
    value: DTensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    cp_axis: str = "cp",
    settings: CPSettings | None = None,
    document_ids: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> DTensor:
    """CP attention on DTensors sharded ``Shard(2)`` over mesh axis ``cp_axis``; returns a DTensor.

    A DTensor's global view is its shards concatenated in rank order, and it carries no layout: the
    shards are taken to be in ``settings.layout`` order, natural order (``"contiguous"``) when it is None -
    what ``distribute_tensor`` produces. Shards cut by another layout (``DTensor.from_local`` of
    :func:`cp_dtensor.shard_sequence` shards) need that layout in the settings.

    Args:
        query: (B, Hq, S, D) DTensor; ``Shard(2)`` on ``cp_axis``, any of Replicate/Shard(0)/Shard(1)
            on the other mesh axes (e.g. heads ``Shard(1)`` over tp).
        key: (B, Hkv, S, D) DTensor with the same mesh and placements.
        value: like ``key``.
        is_causal, scale: as for ``F.scaled_dot_product_attention`` (causal over global positions).
        enable_gqa: must be True when Hq != Hkv (as for SDPA).
        cp_axis: name of the CP mesh axis.
        settings: layout, strategy, backend, stats (:class:`~cp_dtensor.CPSettings`; default p2p, natural order).
        document_ids, window_size: the mask, as for :func:`cp_dtensor.ring_attention` (``document_ids`` for
            the global sequence of this rank's batch rows).

    Returns:
        (B, Hq, S, D) DTensor with ``query``'s mesh and placements.
    """
    settings = settings or CPSettings()
    mesh = query.device_mesh
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, DTensor) or t.device_mesh != mesh or t.placements != query.placements:
            got = (t.device_mesh, t.placements) if isinstance(t, DTensor) else type(t).__name__
            raise ValueError(
                f"Context-parallel SDPA needs query, key and value as DTensors on one mesh with the same "
                f"placements; query has {(mesh, query.placements)}, {name} has {got}."
            )
    axis = _cp_axis_index(query, cp_axis)
    if axis is None or not _is_seq_shard(query.placements[axis]):
        raise ValueError(
            f"query must be Shard(2) on mesh axis {cp_axis!r}; got placements {query.placements}."
        )
    for i, p in enumerate(query.placements):
        if i != axis and not (isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim in (0, 1))):
            kind = "Partial" if isinstance(p, Partial) else str(p)
            raise ValueError(
                f"Context-parallel SDPA supports Replicate, Shard(0) (batch) or Shard(1) (heads) on the "
                f"non-CP mesh axes; axis {mesh.mesh_dim_names[i]!r} has {kind}. Redistribute first."
            )
        if isinstance(p, Shard) and p.dim == 1:
            size = mesh.size(i)
            if query.shape[1] % size or key.shape[1] % size:
                raise ValueError(
                    f"Heads are Shard(1) over mesh axis {mesh.mesh_dim_names[i]!r} of size {size}, which must "
                    f"divide both the {query.shape[1]} query heads and the {key.shape[1]} key/value heads; "
                    f"replicate the key/value heads over that axis or use a size that divides them."
                )
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key/value {key.shape[1]}: pass enable_gqa=True for GQA/MQA."
        )
    if isinstance(settings.layout, LayoutRule):
        raise ValueError(
            f"The CP layout rule {settings.layout!r} plans each batch from its document ids, which "
            f"F.scaled_dot_product_attention cannot carry; shard the batch with the rule's layout and call "
            f"cp_dtensor.document_attention(q, k, v, document_ids=..., positions=...) on local shards."
        )
    mask = AttentionMask.build(is_causal, window_size, local_document_ids(document_ids))
    out = attend(
        query.to_local(), key.to_local(), value.to_local(), mesh.get_group(axis), settings=settings, mask=mask,
        scale=scale, default_layout="contiguous",
    )  # fmt: skip
    return DTensor.from_local(out, mesh, query.placements, run_check=False)


def _cp_group(mesh: DeviceMesh | dist.ProcessGroup, cp_axis: str) -> dist.ProcessGroup:
    """The CP process group of ``mesh``: its ``cp_axis`` axis, or the whole mesh when it is 1-D."""
    if isinstance(mesh, dist.ProcessGroup):
        return mesh
    names = mesh.mesh_dim_names or ()
    if cp_axis in names:
        return mesh.get_group(names.index(cp_axis))
    if mesh.ndim == 1:
        return mesh.get_group()
    raise ValueError(
        f"ContextParallelAttention(mesh=...) needs a 1-D CP mesh or a mesh with a {cp_axis!r} axis; got axes "
        f"{names}. Pass e.g. world_mesh[{cp_axis!r}]."
    )


class ContextParallelAttention(TorchFunctionMode):
    """A mode that runs ``F.scaled_dot_product_attention`` (and :func:`cp_dtensor.document_attention`) as CP
    attention with this object's :class:`~cp_dtensor.CPSettings`.

    Inside the mode (Note [SDPA dispatch]):

    * SDPA on DTensors sequence-sharded (``Shard(2)``) over the ``cp_axis`` mesh axis runs CP attention
      over that axis. A DTensor's global view is the sequence in the order its shards are concatenated:
      natural order for ``distribute_tensor``, so the default ``layout=None`` means ``"contiguous"`` for
      them. Pass ``layout`` when the shards were cut otherwise (e.g. ``DTensor.from_local`` of
      :func:`cp_dtensor.shard_sequence` shards: ``layout="zigzag"``). DTensors carry no layout, so this
      cannot be checked: it is the caller's promise.
    * SDPA and ``document_attention`` on plain tensors are served only when the mode holds a ``mesh``: the
      tensors are then this rank's local sequence shards in ``layout`` (default ``"zigzag"``, as
      :func:`cp_dtensor.shard_sequence`); ``document_attention``'s ``positions`` are checked against it.
      Without a mesh the call raises instead of silently attending over one shard as if it were the
      whole sequence.
    * Calls CP cannot serve exactly (an explicit ``attn_mask``, dropout) raise.

    Args:
        mesh: the CP mesh (1-D, or with a ``cp_axis`` axis, e.g. ``world_mesh["cp", "tp"]``) that plain
            local tensors are sharded over; None: only DTensor calls are served.
        cp_axis: name of the CP mesh axis.
        settings: layout, strategy, group size, backend, stats. The keywords ``layout``, ``comm``,
            ``backend``, ``stats``, ``a2a_size`` build one instead (pass one or the other).
        document_ids: (B, S) ids of packed documents of the global sequence (natural order, the same on
            every CP rank; B = this rank's batch rows) for SDPA calls: a query sees only its own document.
        window_size: ``(left, right)`` sliding window of SDPA calls (flash-attn convention, -1 = unbounded).

    Example::

        with ContextParallelAttention():  # q, k, v: distribute_tensor(x, cp_mesh, [Shard(2)])
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with ContextParallelAttention(world_mesh["cp"], layout="zigzag"):  # local shard_sequence shards
            out = F.scaled_dot_product_attention(q_local, k_local, v_local, is_causal=True)
    """

    def __init__(
        self,
        mesh: DeviceMesh | dist.ProcessGroup | None = None,
        *,
        cp_axis: str = "cp",
        settings: CPSettings | None = None,
        layout: LayoutLike | LayoutRule | None = None,
        comm: str = "p2p",
        document_ids: torch.Tensor | None = None,
        window_size: tuple[int, int] = (-1, -1),
        backend: str | None = None,
        stats: AttentionStats | None = None,
        a2a_size: int | None = None,
    ) -> None:
        super().__init__()
        if settings is None:
            settings = CPSettings(layout=layout, comm=comm, a2a_size=a2a_size, backend=backend, stats=stats)
        elif (layout, comm, backend, stats, a2a_size) != (None, "p2p", None, None, None):
            raise ValueError(
                "ContextParallelAttention got settings= and also layout/comm/backend/stats/a2a_size keywords; "
                "pass one or the other."
            )
        self.settings = settings
        self.window_size = AttentionMask.build(False, window_size).window
        document_ids = local_document_ids(document_ids)
        validate_mask_inputs(
            document_ids, self.window_size, batch=0 if document_ids is None else document_ids.shape[0],
            seq_len=0 if document_ids is None else document_ids.shape[-1],
        )  # fmt: skip
        self.document_ids = document_ids
        self.group = _cp_group(mesh, cp_axis) if mesh is not None else None
        if self.group is not None:
            settings.check_cp(dist.get_world_size(self.group))
        self.cp_axis = cp_axis

    @property
    def layout(self) -> LayoutLike | LayoutRule | None:
        """The settings' layout."""
        return self.settings.layout

    @property
    def stats(self) -> AttentionStats | None:
        """The settings' stats."""
        return self.settings.stats

    def _is_cp_sharded(self, x: Any) -> bool:
        if not isinstance(x, DTensor):
            return False
        axis = _cp_axis_index(x, self.cp_axis)
        return axis is not None and _is_seq_shard(x.placements[axis]) and x.device_mesh.size(axis) > 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is document_attention:
            return self._document_attention(*args, **kwargs)
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(_SDPA_DEFAULTS)
        call.update(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        tensors = [call[n] for n in ("query", "key", "value")]
        if any(isinstance(t, DTensor) for t in tensors):
            if not any(self._is_cp_sharded(t) for t in tensors):
                return func(*args, **kwargs)  # not sequence-sharded on cp: DTensor's own SDPA
            _check_supported(call)
            return context_parallel_sdpa(
                call["query"], call["key"], call["value"],
                is_causal=call["is_causal"], scale=call["scale"], enable_gqa=call["enable_gqa"],
                cp_axis=self.cp_axis, settings=self.settings, document_ids=self.document_ids,
                window_size=self.window_size,
            )  # fmt: skip
        if self.group is None:
            raise ValueError(
                "F.scaled_dot_product_attention got plain tensors inside ContextParallelAttention, which "
                "holds no mesh, so it cannot tell local sequence shards from whole sequences. Either pass "
                "the CP mesh (ContextParallelAttention(world_mesh['cp'], layout=...) or the "
                "cp_dtensor.ContextParallel style, which treat plain q, k, v as this rank's shards), or "
                "give SDPA DTensors sharded Shard(2) on the 'cp' mesh axis."
            )
        _check_supported(call)
        q, k = call["query"], call["key"]
        if q.dim() == 4 and k.dim() == 4 and q.shape[1] != k.shape[1] and not call["enable_gqa"]:
            raise ValueError(
                f"query has {q.shape[1]} heads and key/value {k.shape[1]}: pass enable_gqa=True for GQA/MQA."
            )
        if isinstance(self.settings.layout, LayoutRule) and self.document_ids is None:
            raise ValueError(
                f"F.scaled_dot_product_attention inside a CP mode whose layout is the rule "
                f"{self.settings.layout!r}: a rule plans each batch from its document ids, which SDPA cannot "
                f"carry. Call cp_dtensor.document_attention(q, k, v, document_ids=..., positions=...) instead "
                f"(the models of cp_dtensor.models do when they get document_ids), or use a fixed layout."
            )
        mask = AttentionMask.build(call["is_causal"], self.window_size, self.document_ids)
        return attend(q, k, call["value"], self.group, settings=self.settings, mask=mask, scale=call["scale"])

    def _document_attention(
        self,
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
        """:func:`document_attention` on this rank's local shards (Note [Document attention]); the batch's
        travelling layout, when given, is the call's layout (Note [Travelling layout])."""
        if any(isinstance(t, DTensor) for t in (query, key, value)):
            raise ValueError(
                "document_attention takes this rank's local q, k, v shards (the ContextParallel style's "
                "case); for sequence-sharded DTensors use F.scaled_dot_product_attention inside "
                "ContextParallelAttention(document_ids=..., window_size=...)."
            )
        if self.group is None:
            raise ValueError(
                "document_attention inside a ContextParallelAttention that holds no mesh: pass the CP mesh "
                "(or apply the cp_dtensor.ContextParallel style) so the local shards can be attended as such."
            )
        mask = AttentionMask.build(is_causal, window_size, local_document_ids(document_ids))
        return attend(
            query, key, value, self.group, settings=self.settings, mask=mask, scale=scale,
            token_positions=positions.to_local() if isinstance(positions, DTensor) else positions,
            layout_positions=local_document_ids(layout_positions),
        )  # fmt: skip


def _check_supported(call: dict[str, Any]) -> None:
    """Refuse what CP cannot serve exactly: an explicit attn_mask, dropout."""
    if call["attn_mask"] is not None:
        raise ValueError(
            "Context-parallel SDPA does not take an explicit attn_mask (it would need the full S x S mask "
            "on every rank). Describe the mask instead: is_causal=True, and for packed documents or a "
            "sliding window pass document_ids=... / window_size=(left, right) to ContextParallelAttention "
            "(or to cp_dtensor.ring_attention)."
        )
    if call["dropout_p"] != 0.0:
        raise ValueError(
            f"Context-parallel SDPA does not support attention dropout (dropout_p={call['dropout_p']}); "
            f"set it to 0.0."
        )
