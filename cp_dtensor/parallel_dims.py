"""Parallel degrees and the one 4-D DeviceMesh ("pp", "dp", "cp", "tp") that training runs on.

Note [The mesh]
~~~~~~~~~~~~~~~
Ranks are laid out row-major over (pp, dp, cp, tp), so tp neighbours are adjacent ranks (fast links) and
pp is outermost. Axes of size 1 are kept, so code never branches on which axes exist. Derived meshes::

    world_mesh["cp", "tp"]   activations: sequence Shard(1) over cp (and over tp with sequence parallel)
    dp_cp (flattened)        dp x cp flattened: FSDP shards parameters here (CP ranks hold the same
                             weights) and gradients / the global token count are reduced here
    world_mesh["dp","cp","tp"]  batches: rows Shard(0) over dp, sequence Shard(1) over cp (shard_batch)

    world = 8, pp=1 dp=2 cp=2 tp=2:      tp
                                        0 1      dp=0: cp=0 -> ranks 0,1   cp=1 -> ranks 2,3
                                        2 3      dp=1: cp=0 -> ranks 4,5   cp=1 -> ranks 6,7
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cp_dtensor.layout import chunks_per_rank

__all__ = ["MESH_AXES", "ParallelDims", "default_device_type", "seq_len_divisor", "seq_len_problem"]

MESH_AXES: tuple[str, str, str, str] = ("pp", "dp", "cp", "tp")


def seq_len_divisor(*, cp: int, tp: int, layout: str = "zigzag") -> int:
    """What a global sequence length must be a multiple of: tp x cp x chunks per CP rank of ``layout``.

    The one home of this rule (config validation, :class:`ParallelDims`, the planner and the integrations
    all ask here): sequence parallelism splits the sequence over tp ranks, CP over cp ranks, and a layout
    cuts each CP shard into ``chunks_per_rank(layout)`` chunks (2 for zigzag).
    """
    return tp * cp * (chunks_per_rank(layout) if cp > 1 else 1)


def seq_len_problem(
    seq_len: int, *, cp: int, tp: int, layout: str = "zigzag", name: str = "seq_len"
) -> str | None:
    """Why ``seq_len`` cannot be split over ``cp`` x ``tp`` ranks in ``layout``, or None when it can.

    The message starts with ``{name}={seq_len}`` and names the multiple, its factors and the nearest
    valid lengths.
    """
    d = seq_len_divisor(cp=cp, tp=tp, layout=layout)
    if seq_len > 0 and seq_len % d == 0:
        return None
    factors = f"tensor_parallel_degree {tp} x context_parallel_degree {cp}"
    if cp > 1 and chunks_per_rank(layout) > 1:
        factors += f" x {chunks_per_rank(layout)} {layout} chunks per rank"
    lower = seq_len // d * d
    suggestion = f"use {lower} or {lower + d}" if lower > 0 else f"use {d}"
    return f"{name}={seq_len} must be a multiple of {d} ({factors}); {suggestion}"


def default_device_type() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"`` (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ParallelDims:
    """Parallel degrees, validated against the world size.

    Args:
        dp: data-parallel degree (FSDP over dp x cp); -1 infers it as world_size / (pp * cp * tp).
        pp: pipeline-parallel degree.
        cp: context-parallel degree (1 = off).
        tp: tensor-parallel degree (with sequence parallelism).
        world_size: number of ranks; default: the initialized process group's size, else the product.
        cp_layout: sequence layout of CP shards, used by :attr:`seq_len_divisor`.
    """

    dp: int = -1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    world_size: int | None = None
    cp_layout: str = "zigzag"
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _dp_cp_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("pp", "cp", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Parallel degree {name}={value!r} must be an integer >= 1.")
        if not isinstance(self.dp, int) or (self.dp < 1 and self.dp != -1):
            raise ValueError(f"Parallel degree dp={self.dp!r} must be an integer >= 1, or -1 to infer it.")
        chunks_per_rank(self.cp_layout)  # validates the layout name
        if self.world_size is None:
            if dist.is_initialized():
                self.world_size = dist.get_world_size()
            elif self.dp == -1:
                self.world_size = self.pp * self.cp * self.tp
            else:
                self.world_size = self.dp * self.pp * self.cp * self.tp
        others = self.pp * self.cp * self.tp
        if self.dp == -1:
            if self.world_size % others != 0:
                raise ValueError(
                    f"Cannot infer dp: world size {self.world_size} is not divisible by "
                    f"pp * cp * tp = {self.pp} * {self.cp} * {self.tp} = {others}."
                )
            self.dp = self.world_size // others
        if self.dp * others != self.world_size:
            raise ValueError(
                f"pp * dp * cp * tp = {self.pp} * {self.dp} * {self.cp} * {self.tp} = {self.dp * others} "
                f"does not equal the world size {self.world_size}; change the degrees or set dp = -1 to infer it."
            )

    # ---- derived properties -------------------------------------------------------------------------
    @property
    def cp_enabled(self) -> bool:
        """CP is on (cp > 1)."""
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        """TP is on (tp > 1)."""
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        """PP is on (pp > 1)."""
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        """Data parallelism is on (dp > 1)."""
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Parameters are sharded over dp x cp (both CP ranks and DP ranks hold the same weights)."""
        return self.dp * self.cp > 1

    @property
    def dp_cp(self) -> int:
        """Size of the flattened dp x cp axis (FSDP and loss reduction)."""
        return self.dp * self.cp

    @property
    def seq_len_divisor(self) -> int:
        """What the global sequence length must be a multiple of: tp x cp x chunks per rank of the layout."""
        return seq_len_divisor(cp=self.cp, tp=self.tp, layout=self.cp_layout)

    def validate_seq_len(self, seq_len: int) -> None:
        """Raise ``ValueError`` naming the multiple when ``seq_len`` does not divide."""
        problem = seq_len_problem(seq_len, cp=self.cp, tp=self.tp, layout=self.cp_layout)
        if problem is not None:
            raise ValueError(problem)

    # ---- the mesh ------------------------------------------------------------------------------------
    def build_mesh(self, device_type: str | None = None) -> DeviceMesh:
        """Create the 4-D mesh ("pp", "dp", "cp", "tp") and the flattened "dp_cp" axis; needs init'ed dist."""
        device_type = device_type or default_device_type()
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims was built for world size {self.world_size} but the process group has "
                f"{dist.get_world_size()} ranks."
            )
        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=MESH_AXES)
        self.set_mesh(mesh)
        return mesh

    def set_mesh(self, mesh: DeviceMesh) -> None:
        """Adopt an existing 4-D mesh built for these degrees (e.g. one cached across runs)."""
        if tuple(mesh.mesh_dim_names or ()) != MESH_AXES or tuple(mesh.shape) != (
            self.pp,
            self.dp,
            self.cp,
            self.tp,
        ):
            raise ValueError(
                f"Mesh {mesh.mesh_dim_names} {tuple(mesh.shape)} does not match pp/dp/cp/tp "
                f"{(self.pp, self.dp, self.cp, self.tp)}."
            )
        self._mesh = mesh
        # Keep the flattened dp x cp mesh ourselves (slicing flattened axes from the root is deprecated).
        self._dp_cp_mesh = mesh["dp", "cp"]._flatten("dp_cp")

    @property
    def world_mesh(self) -> DeviceMesh:
        """The mesh built by :meth:`build_mesh`."""
        if self._mesh is None:
            raise RuntimeError("Call ParallelDims.build_mesh() first.")
        return self._mesh

    @property
    def activation_mesh(self) -> DeviceMesh:
        """2-D ("cp", "tp") mesh of sequence-sharded activations."""
        return self.world_mesh["cp", "tp"]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """1-D flattened dp x cp mesh that FSDP2 shards parameters over."""
        if self._dp_cp_mesh is None:
            raise RuntimeError("Call ParallelDims.build_mesh() first.")
        return self._dp_cp_mesh

    @property
    def loss_mesh(self) -> DeviceMesh:
        """1-D dp x cp mesh over which token counts and losses are summed."""
        return self.fsdp_mesh

    @property
    def batch_mesh(self) -> DeviceMesh:
        """3-D ("dp", "cp", "tp") mesh of training batches: rows over dp, sequence shards over cp
        (:func:`cp_dtensor.shard_batch`)."""
        return self.world_mesh["dp", "cp", "tp"]
