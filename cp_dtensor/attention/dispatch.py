"""DTensor dispatch: ``F.scaled_dot_product_attention`` on sequence-sharded DTensors runs the ring op.

Note [SDPA dispatch]
~~~~~~~~~~~~~~~~~~~~
A :class:`ContextParallelAttention` object is a ``TorchFunctionMode`` that the caller holds and enters
(``with cp_attention: ...``), or that the :class:`~cp_dtensor.styles.ContextParallel` style enters around
one module's forward. While it is active, SDPA calls take one of two paths::

    F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=..., enable_gqa=...)

    (a) q, k, v DTensors, Shard(2) on the "cp" mesh axis  (other axes: Replicate / Shard(0) / Shard(1))
          |  to_local(): (B, Hq_local, S_local, D), no communication
          |  ring_attention(..., layout=self.layout or "contiguous")   the global view is the order
          v                                                            of the shards: natural order
        DTensor out, q's placements

    (b) q, k, v plain tensors, the mode holds a CP mesh (the ContextParallel style's case)
          |  they are this rank's local shards, in self.layout (default "zigzag")
          |  ring_attention(q, k, v, cp group, layout=..., comm=...)
          v
        local out (B, Hq_local, S_local, D)

    plain tensors and no mesh: ValueError (a shard must never be attended as if it were the sequence)

DTensors that are not sequence-sharded on the CP axis pass through to DTensor's own SDPA. Nothing is
global: mesh, layout and comm mode live on the object, and ``F.scaled_dot_product_attention`` is never
patched. Calls that CP cannot serve exactly (an explicit ``attn_mask``, dropout) raise instead of
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

from cp_dtensor.attention.comm import RingStats
from cp_dtensor.attention.custom_ops import compiled_ring_attention, register_stats
from cp_dtensor.attention.mask import AttentionMask, validate_mask_inputs
from cp_dtensor.attention.ring import COMM_MODES, ring_attention
from cp_dtensor.layout import LayoutLike, check_rank_positions, tensor_digest, validate_layout

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
    layout: LayoutLike = "zigzag",
    comm: str = "p2p",
    document_ids: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
    stats: RingStats | None = None,
    a2a_size: int | None = None,
) -> DTensor:
    """Ring attention on DTensors sharded ``Shard(2)`` over mesh axis ``cp_axis``; returns a DTensor.

    Args:
        query: (B, Hq, S, D) DTensor; ``Shard(2)`` on ``cp_axis``, any of Replicate/Shard(0)/Shard(1)
            on the other mesh axes (e.g. heads ``Shard(1)`` over tp).
        key: (B, Hkv, S, D) DTensor with the same mesh and placements.
        value: like ``key``.
        is_causal, scale: as for ``F.scaled_dot_product_attention`` (causal over global positions).
        enable_gqa: must be True when Hq != Hkv (as for SDPA).
        cp_axis: name of the CP mesh axis.
        layout, comm, document_ids, window_size, backend, stats, a2a_size: as for
            :func:`cp_dtensor.ring_attention` (``document_ids`` for the global sequence of this rank's
            batch rows).

    Returns:
        (B, Hq, S, D) DTensor with ``query``'s mesh and placements.
    """
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
    group = mesh.get_group(axis)
    out = ring_attention(
        query.to_local(), key.to_local(), value.to_local(), group,
        is_causal=is_causal, scale=scale, layout=layout, comm=comm, document_ids=document_ids,
        window_size=window_size, backend=backend, stats=stats, a2a_size=a2a_size,
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
    """A mode that runs ``F.scaled_dot_product_attention`` as CP attention with this object's settings.

    Inside the mode (Note [SDPA dispatch]):

    * SDPA on DTensors sequence-sharded (``Shard(2)``) over the ``cp_axis`` mesh axis runs the ring op
      over that axis. A DTensor's global view is the sequence in the order its shards are concatenated:
      natural order for ``distribute_tensor``, so the default ``layout=None`` means ``"contiguous"`` for
      them. Pass ``layout`` when the shards were cut otherwise (e.g. ``DTensor.from_local`` of
      :func:`cp_dtensor.shard_sequence` shards: ``layout="zigzag"``).
    * SDPA on plain tensors is served only when the mode holds a ``mesh``: the tensors are then this
      rank's local sequence shards in ``layout`` (default ``"zigzag"``, as :func:`cp_dtensor.shard_sequence`).
      Without a mesh the call raises instead of silently attending over one shard as if it were the
      whole sequence.
    * Calls CP cannot serve exactly (an explicit ``attn_mask``, dropout) raise.

    Args:
        mesh: the CP mesh (1-D, or with a ``cp_axis`` axis, e.g. ``world_mesh["cp", "tp"]``) that plain
            local tensors are sharded over; None: only DTensor calls are served.
        cp_axis: name of the CP mesh axis.
        layout: the sequence layout of the shards (``"zigzag"``, ``"contiguous"`` or a layout object from
            :func:`cp_dtensor.balanced_layout`); None: natural order for DTensors, zigzag for local shards.
        document_ids: (B, S) ids of packed documents of the global sequence (natural order, the same on
            every CP rank; B = this rank's batch rows): a query sees only its own document.
        window_size: ``(left, right)`` sliding window (flash-attn convention, -1 = unbounded).
        comm: ``"p2p"``, ``"allgather"``, ``"alltoall"``, ``"hybrid"`` or ``"auto"`` (the cost model's choice
            per call shape; see :func:`cp_dtensor.ring_attention`).
        backend: kernel adapter name, or ``None`` to choose from device and dtype.
        stats: optional :class:`RingStats` accumulating bytes and work of every dispatched call.
        a2a_size: ranks per all-to-all group, required by ``comm="hybrid"`` (a divisor of the CP degree).

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
        layout: LayoutLike | None = None,
        comm: str = "p2p",
        document_ids: torch.Tensor | None = None,
        window_size: tuple[int, int] = (-1, -1),
        backend: str | None = None,
        stats: RingStats | None = None,
        a2a_size: int | None = None,
    ) -> None:
        super().__init__()
        if layout is not None and not callable(layout):
            validate_layout(layout)
        validate_mask_inputs(
            document_ids, window_size, batch=0 if document_ids is None else document_ids.shape[0],
            seq_len=0 if document_ids is None else document_ids.shape[-1],
        )  # fmt: skip
        self.document_ids = document_ids
        self.window_size = tuple(window_size)
        self._rule_cache: dict[tuple, LayoutLike] = {}
        if stats is not None:
            register_stats(stats)  # reachable from the compiled path's custom ops
        if comm not in COMM_MODES:
            raise ValueError(f"Unknown CP comm mode {comm!r}; expected one of {COMM_MODES}.")
        if (comm == "hybrid" and a2a_size is None) or (
            a2a_size is not None and comm in ("p2p", "allgather", "auto")
        ):
            raise ValueError(
                f"a2a_size={a2a_size!r} with comm={comm!r}: comm='hybrid' needs a2a_size (the ranks per "
                f"all-to-all group, a divisor of the CP degree) and comm='p2p' / 'allgather' / 'auto' take "
                f"none ('auto' chooses it)."
            )
        self.a2a_size = a2a_size
        self.group = _cp_group(mesh, cp_axis) if mesh is not None else None
        self.cp_axis = cp_axis
        self.layout = layout
        self.comm = comm
        self.backend = backend
        self.stats = stats

    def _is_cp_sharded(self, x: Any) -> bool:
        if not isinstance(x, DTensor):
            return False
        axis = _cp_axis_index(x, self.cp_axis)
        return axis is not None and _is_seq_shard(x.placements[axis]) and x.device_mesh.size(axis) > 1

    serves_document_attention = True  # cp_dtensor.document_attention hands its calls to this mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
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
                cp_axis=self.cp_axis, layout=self.layout or "contiguous", comm=self.comm,
                document_ids=self.document_ids, window_size=self.window_size, backend=self.backend,
                stats=self.stats, a2a_size=self.a2a_size,
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
        return ring_attention(
            q, k, call["value"], self.group,
            is_causal=call["is_causal"], scale=call["scale"], layout=self.layout or "zigzag",
            comm=self.comm, document_ids=self.document_ids, window_size=self.window_size,
            backend=self.backend, stats=self.stats, a2a_size=self.a2a_size,
        )  # fmt: skip

    def _layout_for(self, document_ids: torch.Tensor | None, cp: int) -> LayoutLike:
        """This call's layout: the fixed one, or the layout rule applied to the batch's document ids."""
        layout = self.layout if self.layout is not None else "zigzag"
        if not callable(layout):
            return layout
        if document_ids is None:
            raise ValueError(
                f"The CP layout rule {layout!r} derives the layout from document ids, but the attention call "
                f"passed none; pass document_ids or use a fixed layout."
            )
        key = (tensor_digest(document_ids), cp)
        if key not in self._rule_cache:
            self._rule_cache.clear()  # one batch at a time: every layer of a step uses the same ids
            self._rule_cache[key] = layout(document_ids, cp)
        return self._rule_cache[key]

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
    ) -> torch.Tensor:
        """:func:`document_attention` on this rank's local shards (Note [Document attention])."""
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
        if torch.compiler.is_compiling():  # the layout rule and the positions check run inside the op
            return compiled_ring_attention(
                query, key, value, self.group, mask=AttentionMask(is_causal, tuple(window_size), document_ids),
                layout=self.layout if self.layout is not None else "zigzag", comm=self.comm,
                scale=scale if scale is not None else query.shape[-1] ** -0.5, backend=self.backend,
                a2a_size=self.a2a_size, stats=self.stats, token_positions=positions,
            )  # fmt: skip
        cp = dist.get_world_size(self.group)
        layout = self._layout_for(document_ids, cp)
        if positions is not None:
            check_rank_positions(positions, layout, dist.get_rank(self.group), cp)
        return ring_attention(
            query, key, value, self.group, is_causal=is_causal, scale=scale, layout=layout, comm=self.comm,
            document_ids=document_ids, window_size=window_size, backend=self.backend, stats=self.stats,
            a2a_size=self.a2a_size,
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
