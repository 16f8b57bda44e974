"""Context parallelism for a model: sequence-sharded DTensor activations and CP attention.

Note [Context-parallel model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Between transformer blocks the hidden state is a DTensor on the ("cp", "tp") activation mesh, sequence
``Shard(1)`` over cp (and over tp when sequence parallelism is on). Leaf modules run unchanged on the local
shard; only attention communicates::

    batch (global) --shard_batch--> tokens/positions DTensor [Shard(1) on cp]
    model(...)         root pre-hook: DTensor inputs -> local shards
      tok_embeddings   local (B, S_local, D)
      block i          pre-hook: local -> DTensor [Shard(1), Shard(1)|Replicate]  (block input)
        child(x)       pre-hook: DTensor -> local; post-hook: local -> DTensor   (norms, attention, mlp)
        x + child(x)   a DTensor op on the shard: no communication
        sdpa(q, k, v)  pre-hook: local -> DTensor [Shard(2) on cp, Shard(1)|Replicate on tp],
                       enters ContextParallelAttention -> ring op (Note [SDPA dispatch])
      norm, output     pre-hook: DTensor -> local
    logits             root post-hook: local (B, S_local, V)

The settings (mesh, layout, comm) live in the :class:`ContextParallelAttention` object returned by
:func:`apply_context_parallel`; no global state, no patched torch function. The global view of a zigzag
DTensor is the sequence in layout order; :func:`unshard_sequence_output` restores natural order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.utils._pytree import tree_map

from cp_dtensor.attention.comm import RingStats
from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.layout import shard_sequence_for_rank, unshard_sequence, validate_seq_len

__all__ = [
    "activation_placements",
    "apply_context_parallel",
    "attach_context_parallel_attention",
    "shard_batch",
    "unshard_sequence_output",
]


def _axis(mesh: DeviceMesh, name: str) -> int:
    names = mesh.mesh_dim_names or ()
    if name not in names:
        raise ValueError(f"Mesh axes {names} have no {name!r} axis.")
    return names.index(name)


def activation_placements(mesh: DeviceMesh, seq_dim: int, *, sequence_parallel: bool) -> list[Placement]:
    """Placements of a sequence-sharded activation on ``mesh`` ("cp" [, "tp"]): Shard(seq_dim) on cp,
    Shard(seq_dim) on tp when ``sequence_parallel`` else Replicate, Replicate elsewhere."""
    placements: list[Placement] = [Replicate()] * mesh.ndim
    placements[_axis(mesh, "cp")] = Shard(seq_dim)
    if sequence_parallel and "tp" in (mesh.mesh_dim_names or ()):
        placements[_axis(mesh, "tp")] = Shard(seq_dim)
    return placements


def _to_local(x: Any) -> Any:
    return x.to_local() if isinstance(x, DTensor) else x


def _unwrap_all(args: Any) -> Any:
    return tree_map(_to_local, args)


class _ActivationWrapper:
    """Converts between local shards and DTensors on the activation mesh (the hooks' only job)."""

    def __init__(self, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.mesh = mesh
        self.hidden = activation_placements(mesh, 1, sequence_parallel=sequence_parallel)  # (B, S, D)

    def wrap_hidden(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if isinstance(x, DTensor):
            if x.device_mesh == self.mesh:
                return x
            x = x.to_local()  # e.g. a tp-mesh DTensor from a tensor-parallel style
        return DTensor.from_local(x, self.mesh, self.hidden, run_check=False)

    # ---- hooks ----
    def root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _unwrap_all(args), _unwrap_all(kwargs)

    def root_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return _unwrap_all(output)

    def block_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self.wrap_hidden(args[0]), *args[1:]), kwargs
        return args, kwargs

    def child_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _unwrap_all(args), _unwrap_all(kwargs)

    def child_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.wrap_hidden(output)


class _AttentionScope:
    """Wraps q, k, v as DTensors and enters the CP attention mode around one attention module."""

    def __init__(self, mesh: DeviceMesh, placements: list[Placement], mode: ContextParallelAttention) -> None:
        self.mesh = mesh
        self.placements = placements
        self.mode = mode
        self.depth = 0

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.mode.__enter__()
        self.depth += 1
        wrapped = tuple(
            DTensor.from_local(a, self.mesh, self.placements, run_check=False)  # (B, H, S_local, D) -> global
            if isinstance(a, torch.Tensor) and not isinstance(a, DTensor)
            else a
            for a in args
        )
        return wrapped, kwargs

    def post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.depth:  # always_call: also runs when the forward raised
            self.depth -= 1
            self.mode.__exit__(None, None, None)
        return _to_local(output)


def attach_context_parallel_attention(
    attention_modules: Iterable[nn.Module],
    mesh: DeviceMesh,
    mode: ContextParallelAttention,
    *,
    heads_sharded_over_tp: bool = False,
) -> None:
    """Make modules whose ``forward(q, k, v)`` calls SDPA on local shards run the ring op.

    A pre-hook wraps the local (B, H_local, S_local, D) q, k, v as DTensors ``Shard(2)`` on the "cp" axis of
    ``mesh`` (and ``Shard(1)`` on "tp" when ``heads_sharded_over_tp``) and enters ``mode``; the post-hook
    leaves the mode and returns the local output. Nothing else of the model is touched.
    """
    placements = activation_placements(mesh, 2, sequence_parallel=False)  # (B, H, S, D)
    if heads_sharded_over_tp and "tp" in (mesh.mesh_dim_names or ()):
        placements[_axis(mesh, "tp")] = Shard(1)
    for module in attention_modules:
        scope = _AttentionScope(mesh, placements, mode)
        module.register_forward_pre_hook(scope.pre, with_kwargs=True)
        module.register_forward_hook(scope.post, always_call=True)


def apply_context_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    blocks: Iterable[nn.Module],
    attention_modules: Iterable[nn.Module],
    final_modules: Iterable[nn.Module] = (),
    layout: str = "zigzag",
    comm: str = "p2p",
    sequence_parallel: bool = False,
    backend: str | None = None,
    stats: RingStats | None = None,
) -> ContextParallelAttention:
    """Install context parallelism on ``model`` (see Note [Context-parallel model]).

    Args:
        model: the root module; its inputs may be DTensors from :func:`shard_batch`.
        mesh: the activation mesh with axes ("cp", "tp") (or just "cp").
        blocks: transformer blocks: their input becomes a sequence-sharded DTensor and their direct
            children run on local shards.
        attention_modules: modules whose forward(q, k, v) calls ``F.scaled_dot_product_attention``.
        final_modules: modules after the blocks that take the hidden state (e.g. the final norm).
        layout, comm, backend, stats: settings of the ring op (see :func:`cp_dtensor.ring_attention`).
        sequence_parallel: True when TP runs with sequence parallelism (hidden states also Shard(1) on tp).

    Returns:
        The :class:`ContextParallelAttention` object holding the CP settings.
    """
    mode = ContextParallelAttention(cp_axis="cp", layout=layout, comm=comm, backend=backend, stats=stats)
    wrapper = _ActivationWrapper(mesh, sequence_parallel)
    model.register_forward_pre_hook(wrapper.root_pre, with_kwargs=True, prepend=True)
    model.register_forward_hook(wrapper.root_post)
    for block in blocks:
        block.register_forward_pre_hook(wrapper.block_pre, with_kwargs=True)
        for child in block.children():
            child.register_forward_pre_hook(wrapper.child_pre, with_kwargs=True, prepend=True)
            child.register_forward_hook(wrapper.child_post)
    for module in final_modules:
        module.register_forward_pre_hook(wrapper.child_pre, with_kwargs=True, prepend=True)
    attach_context_parallel_attention(attention_modules, mesh, mode, heads_sharded_over_tp=sequence_parallel)
    return mode


def shard_batch(
    batch: Mapping[str, torch.Tensor], mesh: DeviceMesh, *, layout: str = "zigzag", seq_dim: int = 1
) -> dict[str, DTensor]:
    """This rank's sequence shards of a batch, as DTensors on ``mesh`` (Shard(seq_dim) on "cp").

    Every tensor of ``batch`` (e.g. tokens, labels (B, S)) is cut along ``seq_dim`` by ``layout``; a
    ``"positions"`` entry (B, S) with the global positions is added when missing, so rotary embeddings
    see the right positions whatever the permutation. Other mesh axes are Replicate.
    """
    cp_axis = _axis(mesh, "cp")
    cp, cp_rank = mesh.size(cp_axis), mesh.get_local_rank(cp_axis)
    batch = dict(batch)
    first = next(iter(batch.values()))
    validate_seq_len(first.shape[seq_dim], cp, layout)
    if "positions" not in batch:
        seq = first.shape[seq_dim]
        batch["positions"] = torch.arange(seq, device=first.device).expand((*first.shape[:seq_dim], seq))
    placements = activation_placements(mesh, seq_dim, sequence_parallel=False)
    return {
        name: DTensor.from_local(
            shard_sequence_for_rank(t, cp_rank, cp, seq_dim, layout), mesh, placements, run_check=False
        )
        for name, t in batch.items()
    }


def unshard_sequence_output(
    x: torch.Tensor, mesh: DeviceMesh, *, layout: str = "zigzag", seq_dim: int = 1
) -> torch.Tensor:
    """Full tensor in natural sequence order from a CP-sharded DTensor or this rank's local shard.

    A collective over the cp axis (and over the other axes when ``x`` is a DTensor sharded on them).
    """
    if isinstance(x, DTensor):
        cp_axis = _axis(x.device_mesh, "cp")
        target = [Replicate()] * x.device_mesh.ndim
        target[cp_axis] = x.placements[cp_axis]
        x = x.redistribute(x.device_mesh, target).to_local()
    return unshard_sequence(x.contiguous(), mesh.get_group(_axis(mesh, "cp")), seq_dim, layout)
