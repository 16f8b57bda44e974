"""DTensor dispatch: ``F.scaled_dot_product_attention`` on sequence-sharded DTensors runs the ring op.

Note [SDPA dispatch]
~~~~~~~~~~~~~~~~~~~~
A :class:`ContextParallelAttention` object is a ``TorchFunctionMode`` that the caller holds and enters
(``with cp_attention: ...``, or the context-parallel style enters it around each attention module). While
it is active::

    F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=..., enable_gqa=...)
      q, k, v: DTensors, Shard(2) on the CP axis        (other axes: Replicate / Shard(0) / Shard(1))
        |  to_local()                      (B, Hq_local, S_local, D), no communication
        v
      ring_attention(q_l, k_l, v_l, cp group, layout=self.layout, comm=self.comm)
        |  DTensor.from_local(out, q.device_mesh, q.placements)
        v
      DTensor out, same placements as q

Calls whose tensors are not sequence-sharded on the CP axis pass through untouched. Nothing is global:
the layout and comm mode live on the object, and ``F.scaled_dot_product_attention`` is never patched.
Calls that CP cannot serve exactly (an explicit ``attn_mask``, dropout) raise instead of gathering.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.overrides import TorchFunctionMode

from cp_dtensor.attention.comm import RingStats
from cp_dtensor.attention.ring import COMM_MODES, ring_attention
from cp_dtensor.layout import validate_layout

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
    layout: str = "zigzag",
    comm: str = "p2p",
    backend: str | None = None,
    stats: RingStats | None = None,
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
        layout, comm, backend, stats: as for :func:`cp_dtensor.ring_attention`.

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
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads and key/value {key.shape[1]}: pass enable_gqa=True for GQA/MQA."
        )
    group = mesh.get_group(axis)
    out = ring_attention(
        query.to_local(), key.to_local(), value.to_local(), group,
        is_causal=is_causal, scale=scale, layout=layout, comm=comm, backend=backend, stats=stats,
    )  # fmt: skip
    return DTensor.from_local(out, mesh, query.placements, run_check=False)


class ContextParallelAttention(TorchFunctionMode):
    """A mode that routes SDPA on CP-sharded DTensors to the ring op with this object's settings.

    Args:
        cp_axis: name of the CP mesh axis the DTensors are sequence-sharded over.
        layout: the sequence layout of the shards (``"zigzag"`` or ``"contiguous"``).
        comm: ``"p2p"`` or ``"allgather"``.
        backend: kernel adapter name, or ``None`` to choose from device and dtype.
        stats: optional :class:`RingStats` accumulating bytes and work of every dispatched call.

    Example::

        cp_attention = ContextParallelAttention(layout="zigzag")
        with cp_attention:
            out = F.scaled_dot_product_attention(q_dt, k_dt, v_dt, is_causal=True)
    """

    def __init__(
        self,
        cp_axis: str = "cp",
        layout: str = "zigzag",
        comm: str = "p2p",
        backend: str | None = None,
        stats: RingStats | None = None,
    ) -> None:
        super().__init__()
        validate_layout(layout)
        if comm not in COMM_MODES:
            raise ValueError(f"Unknown CP comm mode {comm!r}; expected one of {COMM_MODES}.")
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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(_SDPA_DEFAULTS)
        call.update(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        if not any(self._is_cp_sharded(call[n]) for n in ("query", "key", "value")):
            return func(*args, **kwargs)
        if call["attn_mask"] is not None:
            raise ValueError(
                "Context-parallel SDPA on sequence-sharded DTensors does not take an explicit attn_mask "
                "(it would need the full mask on every rank); use is_causal=True or no mask."
            )
        if call["dropout_p"] != 0.0:
            raise ValueError(
                f"Context-parallel SDPA does not support attention dropout (dropout_p={call['dropout_p']}); "
                f"set it to 0.0."
            )
        return context_parallel_sdpa(
            call["query"], call["key"], call["value"],
            is_causal=call["is_causal"], scale=call["scale"], enable_gqa=call["enable_gqa"],
            cp_axis=self.cp_axis, layout=self.layout, comm=self.comm, backend=self.backend, stats=self.stats,
        )  # fmt: skip
