"""Sequence-sharded batches and activations as DTensors: the one batch sharder, and the way back.

Note [Travelling layout]
~~~~~~~~~~~~~~~~~~~~~~~~
A data-dependent layout (a balanced layout, or a rule's layout of this batch) is resolved once, here, and
travels with the batch as the tensor ``layout_positions`` (B, S) - the rank-concatenated positions, whole
on every CP rank like ``document_ids``::

    shard_batch(batch, mesh, layout=rule) -> rule(document_ids, cp) once -> tokens, labels, positions (shards),
                                             document_ids, layout_positions (whole rows)
      -> train_step / eval_step -> pipeline microbatches split the rows -> model(..., layout_positions=)
      -> document_attention(..., layout_positions=) -> the CP mode builds the call's layout from it

So pipeline microbatches, accumulation chunks and activation-checkpoint recomputation all carry exactly the
rows of the layout the batch was sharded with, and the attention call never applies the rule again.

Note [Layout-ordered DTensors]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A DTensor's global view is its shards concatenated in rank order. For a batch cut by the ``zigzag``
layout that view is the sequence *in layout order*, not in natural order (CP = 2, S = 8)::

    natural:      t0 t1 t2 t3 t4 t5 t6 t7
    rank 0 holds  t0 t1 | t6 t7      (chunks 0 and 3)
    rank 1 holds  t2 t3 | t4 t5      (chunks 1 and 2)
    global view:  t0 t1 t6 t7 t2 t3 t4 t5      <- what .full_tensor() returns for a zigzag batch

Every per-token module (embedding, norms, MLP, loss) is indifferent to that permutation, positions
travel with the tokens (``shard_batch`` adds them), and attention is told the layout explicitly
(:class:`~cp_dtensor.styles.ContextParallel`), so the model is exact. To get natural order back, use
:func:`unshard_sequence_output` with the same layout, never ``full_tensor()``. With ``layout="contiguous"``
the global view is the natural order.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from cp_dtensor.layout import (
    LayoutLike,
    LayoutRule,
    SequenceLayout,
    shard_sequence_for_rank,
    unshard_sequence,
    validate_seq_len,
)

__all__ = ["activation_placements", "batch_rows", "cp_axis_of", "shard_batch", "unshard_sequence_output"]


def cp_axis_of(mesh: DeviceMesh) -> int:
    """Index of the "cp" axis of ``mesh``; a 1-D mesh without a "cp" axis is taken as the CP axis."""
    names = mesh.mesh_dim_names or ()
    if "cp" in names:
        return names.index("cp")
    if mesh.ndim == 1:
        return 0
    raise ValueError(f"Mesh axes {names} have no 'cp' axis; pass e.g. world_mesh['dp', 'cp', 'tp'].")


def activation_placements(mesh: DeviceMesh, seq_dim: int, *, sequence_parallel: bool) -> list[Placement]:
    """Placements of a sequence-sharded activation on ``mesh``: Shard(seq_dim) on "cp", Shard(seq_dim) on
    "tp" when ``sequence_parallel`` else Replicate, Shard(0) on "dp" (batch rows), Replicate elsewhere."""
    names = mesh.mesh_dim_names or ()
    placements: list[Placement] = [Replicate()] * mesh.ndim
    if "dp" in names:
        placements[names.index("dp")] = Shard(0)
    if sequence_parallel and "tp" in names:
        placements[names.index("tp")] = Shard(seq_dim)
    placements[cp_axis_of(mesh)] = Shard(seq_dim)
    return placements


def shard_batch(
    batch: Mapping[str, torch.Tensor],
    mesh: DeviceMesh,
    *,
    layout: LayoutLike | LayoutRule = "zigzag",
    seq_dim: int = 1,
    whole: Collection[str] = ("document_ids", "layout_positions"),
    rows: Literal["global", "local"] = "global",
) -> dict[str, DTensor]:
    """This rank's part of a global batch, as DTensors on ``mesh`` (the one batch sharder).

    Every tensor of ``batch`` (e.g. tokens, labels (B, S)) is cut into rows over the "dp" axis of ``mesh``
    (when it has one: Shard(0), contiguous row blocks) and into sequence shards over "cp" by ``layout``
    (Shard(seq_dim), see Note [Layout-ordered DTensors]); other axes (e.g. "tp") are Replicate. A
    ``"positions"`` entry (B, S) with the global positions is added when missing and ``seq_dim`` is 1, so
    rotary embeddings see the right positions whatever the permutation. Entries named in ``whole``
    (``document_ids``: the attention mask needs the whole sequence) keep the whole sequence in natural
    order on every CP rank. With a layout object (or a rule, resolved here) a ``"layout_positions"`` entry
    (B, S), its positions, is added, whole on every CP rank (Note [Travelling layout]), on every CP rank (rows still over "dp": Shard(0), Replicate on "cp"). No communication.

    Args:
        batch: the global batch, identical on every rank; all tensors share dims 0 and ``seq_dim``.
        mesh: a mesh with a "cp" axis (e.g. ``world_mesh["dp", "cp", "tp"]``), or a 1-D CP mesh.
        layout: ``"zigzag"``, ``"contiguous"``, a layout object (e.g. from
            :func:`cp_dtensor.balanced_layout` of this batch's document ids), or a layout rule
            (:class:`cp_dtensor.BalancedLayoutRule`), resolved here once for the batch from its
            ``document_ids`` entry (one document per row without one) - the layout the CP style then
            plans with.
        seq_dim: the sequence dim of every tensor.
        whole: names of entries that are not sequence-sharded.
        rows: "global": ``batch`` is the global batch, identical on every rank, and this rank takes its dp
            row block; "local": ``batch`` already holds only this dp rank's rows (a loader that reads only
            its share, e.g. ``GlobalBatchLoader(..., dp_rank=, dp_degree=)``), identical on the ranks of
            one dp rank, and a layout object describes those rows.

    Returns:
        ``{name: DTensor}`` with local shards (B / dp, S / cp, ...); (B, S / cp, ...) for ``rows="local"``.
    """
    if not batch:
        raise ValueError("shard_batch got an empty batch.")
    names = mesh.mesh_dim_names or ()
    cp_axis = cp_axis_of(mesh)
    cp, cp_rank = mesh.size(cp_axis), mesh.get_local_rank(cp_axis)
    dp, dp_rank = (mesh.size(names.index("dp")), mesh.get_local_rank("dp")) if "dp" in names else (1, 0)
    shapes = {name: (t.shape[0], t.shape[seq_dim]) for name, t in batch.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shard_batch: tensors disagree on (rows, sequence length): {shapes}.")
    n_rows, seq_len = next(iter(shapes.values()))
    if isinstance(layout, LayoutRule):
        ids = batch.get("document_ids")
        layout = layout(ids if ids is not None else torch.zeros(n_rows, seq_len, dtype=torch.int64), cp)
    validate_seq_len(seq_len, cp, layout)
    if rows not in ("global", "local"):
        raise ValueError(f'shard_batch: rows must be "global" or "local", got {rows!r}.')
    if rows == "local":  # this dp rank's rows already: nothing to cut on the dp axis
        dp, dp_rank = 1, 0
    if n_rows % dp:
        raise ValueError(f"shard_batch: {n_rows} rows cannot be split over the dp axis of size {dp}.")
    batch = dict(batch)
    if "positions" not in batch and seq_dim == 1:
        device = next(iter(batch.values())).device
        batch["positions"] = torch.arange(seq_len, device=device).expand(n_rows, seq_len)
    per = n_rows // dp
    placements = activation_placements(mesh, seq_dim, sequence_parallel=False)
    whole_placements = list(placements)
    whole_placements[cp_axis] = Replicate()
    if isinstance(layout, SequenceLayout):
        # the layout travels with the batch as a tensor (Note [Travelling layout]): rows follow the batch
        # through pipeline microbatches and recomputation, and CP attention never re-derives it
        batch["layout_positions"] = layout.positions.to(next(iter(batch.values())).device)
        if dp > 1:
            layout = SequenceLayout(layout.positions[dp_rank * per : (dp_rank + 1) * per], cp, layout.name)
    out = {}
    for name, t in batch.items():
        rows_t = t[dp_rank * per : (dp_rank + 1) * per]
        if name in whole:
            out[name] = DTensor.from_local(rows_t.contiguous(), mesh, whole_placements, run_check=False)
        else:
            local = shard_sequence_for_rank(rows_t, cp_rank, cp, seq_dim, layout)
            out[name] = DTensor.from_local(local, mesh, placements, run_check=False)
    return out


def batch_rows(batch: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Local rows ``[start, stop)`` of every tensor of a batch, keeping DTensors DTensors (same placements).

    For gradient accumulation: the rows are this rank's own, so no communication happens.
    """
    out = {}
    for name, t in batch.items():
        if isinstance(t, DTensor):
            out[name] = DTensor.from_local(
                t.to_local()[start:stop], t.device_mesh, t.placements, run_check=False
            )
        else:
            out[name] = t[start:stop]
    return out


def unshard_sequence_output(
    x: torch.Tensor, mesh: DeviceMesh, *, layout: LayoutLike = "zigzag", seq_dim: int = 1
) -> torch.Tensor:
    """Full tensor in natural sequence order from a CP-sharded DTensor or this rank's local shard.

    The way back from layout order (Note [Layout-ordered DTensors]). A collective over the cp axis (and
    over the other axes when ``x`` is a DTensor sharded on them).
    """
    if isinstance(x, DTensor):
        cp_axis = cp_axis_of(x.device_mesh)
        target: list[Placement] = [Replicate()] * x.device_mesh.ndim
        target[cp_axis] = x.placements[cp_axis]
        x = x.redistribute(x.device_mesh, target).to_local()
    return unshard_sequence(x.contiguous(), mesh.get_group(cp_axis_of(mesh)), seq_dim, layout)
