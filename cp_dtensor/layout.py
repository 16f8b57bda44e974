"""Sequence layouts: which tokens of the global sequence each context-parallel rank holds.

Note [Sequence layouts]
~~~~~~~~~~~~~~~~~~~~~~~
A global sequence of length S is cut into equal chunks and dealt to the CP ranks.

``contiguous`` (CP chunks, rank r holds chunk r)::

    sequence:  | c0 | c1 | c2 | c3 |          CP = 4
    rank:        r0   r1   r2   r3

``zigzag`` (2 x CP chunks, rank r holds chunks r and 2*CP-1-r)::

    sequence:  | c0 | c1 | c2 | c3 | c4 | c5 | c6 | c7 |    CP = 4
    rank:        r0   r1   r2   r3   r3   r2   r1   r0

Under a causal mask a query at position i sees i + 1 keys, so with ``contiguous`` the last rank does
about 2 x CP - 1 times the work of the first. ``zigzag`` pairs an early chunk with a late one, so every
rank holds the same number of visible (query, key) pairs. A rank's local shard is its chunks concatenated
in increasing position order, so the causal mask inside a shard is the ordinary lower triangle.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "LAYOUTS",
    "Layout",
    "checked_dim",
    "chunks_per_rank",
    "layout_chunk_ids",
    "layout_permutation",
    "seq_len_multiple",
    "sequence_positions",
    "shard_sequence",
    "unshard_sequence",
    "validate_layout",
    "validate_seq_len",
]

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


def validate_layout(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown sequence layout {layout!r}; expected one of {LAYOUTS}.")


def chunks_per_rank(layout: str) -> int:
    """Number of sequence chunks one rank holds: 1 for contiguous, 2 for zigzag."""
    validate_layout(layout)
    return 2 if layout == "zigzag" else 1


def seq_len_multiple(cp: int, layout: str) -> int:
    """What a global sequence length must be a multiple of for ``cp`` ranks in ``layout``."""
    return cp * chunks_per_rank(layout)


def validate_seq_len(seq_len: int, cp: int, layout: str) -> None:
    """Raise ``ValueError`` naming the numbers when ``seq_len`` cannot be split for ``cp`` ranks."""
    multiple = seq_len_multiple(cp, layout)
    if seq_len % multiple != 0:
        raise ValueError(
            f"Sequence length {seq_len} cannot be split with layout {layout!r} over CP size {cp}: it must "
            f"be a multiple of {multiple} ({chunks_per_rank(layout)} chunk(s) per rank x {cp} ranks). "
            f"Pad the sequence or choose another length."
        )


def checked_dim(dim: int, ndim: int) -> int:
    """``dim`` as a non-negative index into ``ndim`` dims; ``ValueError`` when out of range (no wrap-around)."""
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"seq_dim {dim} is out of range for a {ndim}-D tensor (valid: {-ndim} .. {ndim - 1}); pass the "
            f"sequence dim, e.g. 2 for (B, H, S, D) or 1 for (B, S)."
        )
    return dim % ndim


def layout_chunk_ids(rank: int, cp: int, layout: str) -> tuple[int, ...]:
    """Global chunk indices that ``rank`` holds, in local (increasing position) order."""
    validate_layout(layout)
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is outside the CP group of size {cp}.")
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * cp - 1 - rank)


def layout_permutation(
    seq_len: int, cp: int, layout: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Global token index of every position of the rank-concatenated sequence.

    ``x[..., layout_permutation(S, cp, layout), ...]`` puts rank 0's shard first, then rank 1's, and so on.
    """
    validate_seq_len(seq_len, cp, layout)
    n_chunks = seq_len_multiple(cp, layout)
    chunk_len = seq_len // n_chunks
    order = [c for r in range(cp) for c in layout_chunk_ids(r, cp, layout)]
    idx = torch.arange(seq_len, device=device).view(n_chunks, chunk_len)
    return idx[torch.tensor(order, device=device)].reshape(-1)


def sequence_positions(
    seq_len: int, rank: int, cp: int, layout: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Global positions (int64, shape ``(seq_len // cp,)``) of the tokens ``rank`` holds."""
    validate_seq_len(seq_len, cp, layout)
    local = seq_len // cp
    return layout_permutation(seq_len, cp, layout, device)[rank * local : (rank + 1) * local]


def _rank_and_size(mesh: DeviceMesh | dist.ProcessGroup) -> tuple[int, int, dist.ProcessGroup]:
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(
                f"Expected a 1-D CP DeviceMesh, got a {mesh.ndim}-D mesh with axes {mesh.mesh_dim_names}; "
                f"pass the CP axis, e.g. world_mesh['cp']."
            )
        group = mesh.get_group()
    else:
        group = mesh
    return dist.get_rank(group), dist.get_world_size(group), group


def shard_sequence(
    x: torch.Tensor, mesh: DeviceMesh | dist.ProcessGroup, seq_dim: int, layout: str = "zigzag"
) -> torch.Tensor:
    """Return this rank's shard of the full tensor ``x`` along ``seq_dim`` (no communication).

    Args:
        x: the full tensor, identical on every CP rank.
        mesh: a 1-D CP ``DeviceMesh`` (or its ``ProcessGroup``).
        seq_dim: the sequence dimension of ``x``.
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        A new contiguous tensor with ``x.shape[seq_dim] // cp`` entries along ``seq_dim``.
    """
    rank, cp, _ = _rank_and_size(mesh)
    return shard_sequence_for_rank(x, rank, cp, seq_dim, layout)


def shard_sequence_for_rank(x: torch.Tensor, rank: int, cp: int, seq_dim: int, layout: str) -> torch.Tensor:
    """The shard of ``x`` that ``rank`` of ``cp`` ranks holds (pure indexing; usable without a group)."""
    seq_dim = checked_dim(seq_dim, x.dim())
    seq_len = x.shape[seq_dim]
    validate_seq_len(seq_len, cp, layout)
    chunks = x.chunk(seq_len_multiple(cp, layout), dim=seq_dim)
    return torch.cat([chunks[c] for c in layout_chunk_ids(rank, cp, layout)], dim=seq_dim)


def unshard_sequence_from_shards(shards: list[torch.Tensor], seq_dim: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`shard_sequence_for_rank`: full tensor from every rank's shard (rank order)."""
    cp = len(shards)
    seq_dim = checked_dim(seq_dim, shards[0].dim())
    per_rank = chunks_per_rank(layout)
    chunks: list[torch.Tensor | None] = [None] * (cp * per_rank)
    for rank, shard in enumerate(shards):
        for chunk, part in zip(layout_chunk_ids(rank, cp, layout), shard.chunk(per_rank, dim=seq_dim)):
            chunks[chunk] = part
    return torch.cat(chunks, dim=seq_dim)  # type: ignore[arg-type]


def unshard_sequence(
    x_local: torch.Tensor, mesh: DeviceMesh | dist.ProcessGroup, seq_dim: int, layout: str = "zigzag"
) -> torch.Tensor:
    """All-gather every rank's shard and return the full tensor in natural sequence order.

    Bit-exact inverse of :func:`shard_sequence`. A collective: every CP rank must call it. Not
    differentiable (it is meant for outputs, metrics and tests).
    """
    _, cp, group = _rank_and_size(mesh)
    if cp == 1:
        return x_local.clone()
    gathered = [torch.empty_like(x_local) for _ in range(cp)]
    dist.all_gather(gathered, x_local.contiguous(), group=group)
    return unshard_sequence_from_shards(gathered, seq_dim, layout)
