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

Data-dependent layouts (:class:`SequenceLayout`, e.g. from :func:`cp_dtensor.balanced_layout` for packed
documents) are objects accepted wherever a layout name is. They hold, for every batch row, the global
position of each slot of the rank-concatenated sequence; each rank holds S / cp positions of every row,
in increasing order (so again the causal mask inside a shard is a lower triangle per document)::

    row 0:  rank 0 <- positions [0..3] + [12..15]    rank 1 <- [4..11]       (rows may differ)
"""

from __future__ import annotations

import hashlib
import threading
import weakref

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "LAYOUTS",
    "LAYOUT_RULES",
    "LayoutLike",
    "LayoutRule",
    "SequenceLayout",
    "cached_sequence_layout",
    "check_rank_positions",
    "checked_dim",
    "chunks_per_rank",
    "layout_chunk_ids",
    "layout_name",
    "layout_permutation",
    "rank_segments",
    "seq_len_multiple",
    "sequence_positions",
    "shard_sequence",
    "tensor_digest",
    "unshard_sequence",
    "validate_layout",
    "validate_seq_len",
]

LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


# Note [Digest memo]
# ~~~~~~~~~~~~~~~~~~
# Every attention layer of a step asks for the digest of the same document-ids tensor (the cross-rank
# check, the plan cache). Hashing 128K ids costs ~1 ms, comparing them ~20 us, so the digest is memoized per
# live tensor together with a copy of its content, and reused only while the tensor is *equal* to that copy:
# identity and version counters cannot see a tensor refilled behind autograd's back (``torch.from_numpy``
# of a reused buffer, ``.data.copy_``), content can. A cache of facts: it never changes a digest.
_DIGESTS: dict[int, tuple[weakref.ref, torch.Tensor, str]] = {}
_DIGESTS_LOCK = threading.Lock()


def tensor_digest(t: torch.Tensor) -> str:
    """A content hash of ``t`` that is the same in every process (unlike ``hash(bytes)``, which is salted).

    Memoized per live tensor and checked against its content (Note [Digest memo]), so asking again for an
    unchanged tensor costs one comparison and a tensor changed in place gets its new digest.
    """
    key = id(t)
    host = t.detach().cpu()  # one device-to-host copy, for the comparison and, on a miss, the hash
    with _DIGESTS_LOCK:
        cached = _DIGESTS.get(key)
    if (
        cached is not None
        and cached[0]() is t
        and cached[1].shape == host.shape
        and cached[1].dtype == host.dtype
        and torch.equal(cached[1], host)
    ):
        return cached[2]
    host = host.contiguous()
    digest = hashlib.blake2b(
        host.numpy().tobytes() + str((tuple(host.shape), host.dtype)).encode(), digest_size=16
    ).hexdigest()
    try:
        ref = weakref.ref(t, lambda _, key=key: _DIGESTS.pop(key, None))
    except TypeError:  # not weak-referenceable: do not cache
        return digest
    with _DIGESTS_LOCK:
        _DIGESTS[key] = (ref, host.clone(), digest)
    return digest


class SequenceLayout:
    """A data-dependent sequence layout: which global positions each CP rank holds, row by row.

    Args:
        positions: (B, S) int64; row b lists the global position of every slot of the rank-concatenated
            sequence: rank r holds ``positions[b, r * S/cp : (r + 1) * S/cp]``, increasing within a rank.
            Every row is a permutation of ``range(S)``.
        cp: the CP size the layout was built for.
        name: a short name for messages (e.g. ``"balanced"``).
    """

    def __init__(self, positions: torch.Tensor, cp: int, name: str = "custom") -> None:
        if positions.dim() != 2 or positions.dtype != torch.int64:
            raise ValueError(
                f"SequenceLayout positions must be (B, S) int64, got {tuple(positions.shape)} {positions.dtype}."
            )
        batch, seq_len = positions.shape
        if cp < 1 or seq_len % cp:
            raise ValueError(f"SequenceLayout: sequence length {seq_len} is not a multiple of CP size {cp}.")
        local = positions.view(batch, cp, seq_len // cp)
        if seq_len and not bool((local[..., 1:] > local[..., :-1]).all()):
            raise ValueError("SequenceLayout: positions must increase within each rank's shard.")
        if not torch.equal(positions.sort(dim=1).values, torch.arange(seq_len).expand(batch, seq_len)):
            raise ValueError("SequenceLayout: every row of positions must be a permutation of range(S).")
        self.positions = positions.cpu().clone()  # owned: a layout never changes
        self.cp = cp
        self.name = name
        self.batch, self.seq_len = batch, seq_len
        self.digest = tensor_digest(self.positions)
        self._fingerprint = int(self.digest, 16) ^ hash((name, cp))

    def rank_positions(self, rank: int) -> torch.Tensor:
        """(B, S / cp) global positions that ``rank`` holds, increasing along each row."""
        if not 0 <= rank < self.cp:
            raise ValueError(f"rank {rank} is outside the CP group of size {self.cp}.")
        local = self.seq_len // self.cp
        return self.positions[:, rank * local : (rank + 1) * local]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SequenceLayout)
            and other.cp == self.cp
            and other.name == self.name
            and torch.equal(other.positions, self.positions)
        )

    def __hash__(self) -> int:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"{self.name}(cp={self.cp}, batch={self.batch}, seq_len={self.seq_len}, id={self.digest[:8]})"


LayoutLike = str | SequenceLayout
"""A layout name (``"zigzag"``, ``"contiguous"``) or a :class:`SequenceLayout` object."""


class LayoutRule:
    """A layout *rule*: ``rule(document_ids, cp)`` is a batch's :class:`SequenceLayout` (e.g.
    :class:`cp_dtensor.BalancedLayoutRule`). Rules are resolved once per batch where the batch is sharded
    (:func:`cp_dtensor.shard_batch`); CP attention resolves them again only to check or to plan, and every
    row's layout depends on that row alone, so any subset of rows (a pipeline microbatch) gets the rows
    its batch was sharded with. Subclasses implement :meth:`__call__` and :attr:`name`."""

    name: str = "rule"

    def __call__(self, document_ids: torch.Tensor, cp: int) -> SequenceLayout:
        """The layout of ``document_ids`` (B, S) over ``cp`` ranks."""
        raise NotImplementedError

    def positions(self, document_ids: torch.Tensor, cp: int) -> torch.Tensor:
        """(B, S) int64 positions of the layout (:attr:`SequenceLayout.positions`); rules that run under
        ``torch.compile`` override this with a custom op (the balanced rule does)."""
        return self(document_ids, cp).positions


# Note [Layout memo]: the compiled path hands a layout to its custom op as a positions tensor; every layer
# of a step passes the same one, and validating and wrapping it costs a sort of (B, S). One layout per
# content digest (content-checked, Note [Digest memo]); a cache of facts, bounded.
_LAYOUTS: dict[tuple[str, int], SequenceLayout] = {}


def cached_sequence_layout(positions: torch.Tensor, cp: int, name: str = "balanced") -> SequenceLayout:
    """The :class:`SequenceLayout` of ``positions`` over ``cp`` ranks, built once per content."""
    key = (tensor_digest(positions), cp)
    with _DIGESTS_LOCK:
        layout = _LAYOUTS.get(key)
    if layout is None:
        layout = SequenceLayout(positions.cpu(), cp, name=name)
        with _DIGESTS_LOCK:
            if len(_LAYOUTS) >= 8:
                _LAYOUTS.pop(next(iter(_LAYOUTS)))
            _LAYOUTS[key] = layout
    return layout


def layout_name(layout: LayoutLike) -> str:
    """Short text naming ``layout`` (its name, or the object's repr)."""
    return layout if isinstance(layout, str) else repr(layout)


def validate_layout(layout: LayoutLike) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS` or a :class:`SequenceLayout`."""
    if isinstance(layout, SequenceLayout):
        return
    if layout not in LAYOUTS:
        raise ValueError(
            f"Unknown sequence layout {layout!r}; expected one of {LAYOUTS} or a layout object from "
            f"cp_dtensor.balanced_layout(...)."
        )


LAYOUT_RULES: tuple[str, ...] = ("balanced",)
"""Names of layouts planned per batch (:class:`cp_dtensor.BalancedLayoutRule`): 1 chunk per rank."""


def chunks_per_rank(layout: LayoutLike) -> int:
    """Number of equal sequence chunks one rank holds: 1 for contiguous (and layout objects / rules), 2 for
    zigzag."""
    if layout in LAYOUT_RULES:
        return 1
    validate_layout(layout)
    return 2 if layout == "zigzag" else 1


def seq_len_multiple(cp: int, layout: LayoutLike) -> int:
    """What a global sequence length must be a multiple of for ``cp`` ranks in ``layout``."""
    return cp * chunks_per_rank(layout)


def validate_seq_len(seq_len: int, cp: int, layout: LayoutLike) -> None:
    """Raise ``ValueError`` naming the numbers when ``seq_len`` cannot be split for ``cp`` ranks."""
    if isinstance(layout, SequenceLayout):
        if layout.cp != cp or layout.seq_len != seq_len:
            raise ValueError(
                f"Layout {layout!r} was built for CP size {layout.cp} and sequence length {layout.seq_len}, "
                f"but is used with CP size {cp} and sequence length {seq_len}; build it for this batch "
                f"(cp_dtensor.balanced_layout(document_ids, cp, ...))."
            )
        return
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
    """Global chunk indices that ``rank`` holds, in local (increasing position) order (named layouts)."""
    validate_layout(layout)
    if isinstance(layout, SequenceLayout):
        raise ValueError(f"{layout!r} is not made of equal chunks; use rank_segments or rank_positions.")
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is outside the CP group of size {cp}.")
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * cp - 1 - rank)


def layout_permutation(
    seq_len: int, cp: int, layout: LayoutLike, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Global token index of every position of the rank-concatenated sequence.

    ``x[..., layout_permutation(S, cp, layout), ...]`` puts rank 0's shard first, then rank 1's, and so on.
    (S,) for named layouts; (B, S), one permutation per batch row, for a :class:`SequenceLayout`.
    """
    validate_seq_len(seq_len, cp, layout)
    if isinstance(layout, SequenceLayout):
        return layout.positions.to(device)
    n_chunks = seq_len_multiple(cp, layout)
    chunk_len = seq_len // n_chunks
    order = [c for r in range(cp) for c in layout_chunk_ids(r, cp, layout)]
    idx = torch.arange(seq_len, device=device).view(n_chunks, chunk_len)
    return idx[torch.tensor(order, device=device)].reshape(-1)


def sequence_positions(
    seq_len: int, rank: int, cp: int, layout: LayoutLike, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Global positions (int64) of the tokens ``rank`` holds: ``(seq_len // cp,)`` for named layouts,
    ``(B, seq_len // cp)`` for a :class:`SequenceLayout`."""
    validate_seq_len(seq_len, cp, layout)
    local = seq_len // cp
    return layout_permutation(seq_len, cp, layout, device)[..., rank * local : (rank + 1) * local]


def rank_segments(
    layout: LayoutLike, rank: int, cp: int, seq_len: int, row: int = 0
) -> list[tuple[int, int]]:
    """Maximal contiguous global ranges ``[start, stop)`` that ``rank`` holds in batch ``row``, in local order."""
    validate_seq_len(seq_len, cp, layout)
    if isinstance(layout, str):
        chunk = seq_len // seq_len_multiple(cp, layout)
        ranges = [(c * chunk, (c + 1) * chunk) for c in layout_chunk_ids(rank, cp, layout)]
        merged: list[tuple[int, int]] = []
        for start, stop in ranges:
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], stop)
            else:
                merged.append((start, stop))
        return merged
    pos = layout.rank_positions(rank)[row]
    if pos.numel() == 0:
        return []
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1  # first slot of every later segment
    starts = [0, *breaks.tolist()]
    stops = [*breaks.tolist(), pos.numel()]
    first = pos[starts].tolist()
    return [(f, f + (b - a)) for f, a, b in zip(first, starts, stops)]


def check_rank_positions(positions: torch.Tensor, layout: LayoutLike, rank: int, cp: int) -> None:
    """Raise unless ``positions`` ((B, S_local) or (S_local,)) are the global positions ``layout`` gives
    ``rank``: a batch sharded with another layout must never be attended as if it were this one."""
    s_local = positions.shape[-1]
    expected = sequence_positions(s_local * cp, rank, cp, layout).to(positions.device)
    got = positions if positions.dim() == 2 else positions.unsqueeze(0)
    want = expected if expected.dim() == 2 else expected.unsqueeze(0)
    diff = got != want  # broadcasts (1, S) against (B, S)
    if bool(diff.any()):
        b, i = (int(x) for x in torch.nonzero(diff)[0])
        raise ValueError(
            f"CP rank {rank}, row {b}: the token at local index {i} has position "
            f"{int(got[min(b, got.shape[0] - 1), i])} but the CP attention's layout {layout_name(layout)} puts "
            f"position {int(want[min(b, want.shape[0] - 1), i])} there: shard the batch with the same layout as "
            f"the ContextParallel style (cp_dtensor.shard_batch(..., layout=...)), and give the model the tokens' "
            f"global positions (rotary positions that restart per document go to rope_positions)."
        )


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
    x: torch.Tensor, mesh: DeviceMesh | dist.ProcessGroup, seq_dim: int, layout: LayoutLike = "zigzag"
) -> torch.Tensor:
    """Return this rank's shard of the full tensor ``x`` along ``seq_dim`` (no communication).

    Args:
        x: the full tensor, identical on every CP rank.
        mesh: a 1-D CP ``DeviceMesh`` (or its ``ProcessGroup``).
        seq_dim: the sequence dimension of ``x``.
        layout: ``"zigzag"``, ``"contiguous"`` or a :class:`SequenceLayout` (then ``x`` has the batch at
            dim 0 and each row is permuted by its own positions).

    Returns:
        A new contiguous tensor with ``x.shape[seq_dim] // cp`` entries along ``seq_dim``.
    """
    rank, cp, _ = _rank_and_size(mesh)
    return shard_sequence_for_rank(x, rank, cp, seq_dim, layout)


def _check_rows(x: torch.Tensor, seq_dim: int, layout: SequenceLayout) -> None:
    if seq_dim == 0 or x.shape[0] != layout.batch:
        raise ValueError(
            f"{layout!r} permutes each of its {layout.batch} batch rows differently: the tensor needs the batch "
            f"at dim 0 and the sequence at another dim; got shape {tuple(x.shape)} with seq_dim {seq_dim}."
        )


def shard_sequence_for_rank(
    x: torch.Tensor, rank: int, cp: int, seq_dim: int, layout: LayoutLike
) -> torch.Tensor:
    """The shard of ``x`` that ``rank`` of ``cp`` ranks holds (pure indexing; usable without a group)."""
    seq_dim = checked_dim(seq_dim, x.dim())
    seq_len = x.shape[seq_dim]
    validate_seq_len(seq_len, cp, layout)
    if isinstance(layout, SequenceLayout):
        _check_rows(x, seq_dim, layout)
        index = layout.rank_positions(rank).to(x.device)
        return torch.stack([x[b].index_select(seq_dim - 1, index[b]) for b in range(x.shape[0])])
    chunks = x.chunk(seq_len_multiple(cp, layout), dim=seq_dim)
    return torch.cat([chunks[c] for c in layout_chunk_ids(rank, cp, layout)], dim=seq_dim)


def unshard_sequence_from_shards(
    shards: list[torch.Tensor], seq_dim: int, layout: LayoutLike
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence_for_rank`: full tensor from every rank's shard (rank order)."""
    cp = len(shards)
    seq_dim = checked_dim(seq_dim, shards[0].dim())
    if isinstance(layout, SequenceLayout):
        validate_seq_len(shards[0].shape[seq_dim] * cp, cp, layout)
        _check_rows(shards[0], seq_dim, layout)
        shape = list(shards[0].shape)
        shape[seq_dim] *= cp
        full = shards[0].new_empty(shape)
        for rank, shard in enumerate(shards):
            index = layout.rank_positions(rank).to(shard.device)
            for b in range(shard.shape[0]):
                full[b].index_copy_(seq_dim - 1, index[b], shard[b])
        return full
    per_rank = chunks_per_rank(layout)
    chunks: list[torch.Tensor | None] = [None] * (cp * per_rank)
    for rank, shard in enumerate(shards):
        for chunk, part in zip(layout_chunk_ids(rank, cp, layout), shard.chunk(per_rank, dim=seq_dim)):
            chunks[chunk] = part
    return torch.cat(chunks, dim=seq_dim)  # type: ignore[arg-type]


def unshard_sequence(
    x_local: torch.Tensor, mesh: DeviceMesh | dist.ProcessGroup, seq_dim: int, layout: LayoutLike = "zigzag"
) -> torch.Tensor:
    """All-gather every rank's shard and return the full tensor in natural sequence order.

    Bit-exact inverse of :func:`shard_sequence` with the *same* ``layout``. Shards carry no layout, so a
    different one cannot be detected here (zigzag-cut shards unsharded as "contiguous" come back permuted):
    pass the layout the shards were cut with. A layout object checks the length and CP size it was built
    for. A collective: every CP rank must call it. Not differentiable (it is meant for outputs, metrics and
    tests).
    """
    _, cp, group = _rank_and_size(mesh)
    if cp == 1:
        return x_local.clone()
    gathered = [torch.empty_like(x_local) for _ in range(cp)]
    dist.all_gather(gathered, x_local.contiguous(), group=group)
    return unshard_sequence_from_shards(gathered, seq_dim, layout)
