"""ParallelStyles that apply context parallelism through ``parallelize_module``, like PyTorch's TP styles.

Note [Context-parallel styles]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Two styles, one concern each; every other module runs unchanged on its local shard::

    model            PrepareSequenceShards(use_local_output=True)  shard_batch DTensors -> local shards in,
                                                                   local logits out
      layers.i       PrepareSequenceShards()                       DTensor hidden -> local in; local out ->
                                                                   DTensor [cp: Shard(1), tp: Shard(1) | R]
        attention    ContextParallel(settings)                     every SDPA / document_attention call
                                                                   inside runs CP attention
          (wq, wk, wv, rope, sdpa, wo: local tensors; TP styles, if any, keep doing their own conversions)
      norm           PrepareSequenceShards(use_local_output=True)  DTensor hidden -> local

So between blocks the hidden state is a DTensor sequence-sharded over "cp" (and over "tp" under sequence
parallelism) on the ("cp", "tp") axes of the 4-D mesh, and ``inspect_sharding`` shows it. Inside a block
tensors are local: the layout of a CP shard (zigzag or contiguous) is a permutation of the sequence that
per-token modules do not see, and that only attention has to know. ``ContextParallel`` therefore carries
the layout explicitly and treats the plain q, k, v that reach SDPA as this rank's shards in that layout.

Input hooks are prepended, output hooks appended, so that on a module that also has TP styles (applied
first, Note [Parallelize order]) the CP conversion is the outermost one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.utils._pytree import tree_map

from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.layout import LayoutLike, LayoutRule
from cp_dtensor.sharding import activation_placements

__all__ = ["ContextParallel", "PrepareSequenceShards"]


def _to_local(x: Any) -> Any:
    return x.to_local() if isinstance(x, DTensor) else x


class _BoundaryHooks:
    """The hooks of :class:`PrepareSequenceShards` (methods, not closures: torch.compile guards them cleanly)."""

    def __init__(self, mesh: DeviceMesh, placements: list) -> None:
        self.mesh = mesh
        self.placements = placements

    def inputs_to_local(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook: every DTensor input becomes its local shard."""
        return tree_map(_to_local, args), tree_map(_to_local, kwargs)

    def output_to_dtensor(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook: the local output becomes a sequence-sharded DTensor on the style's mesh."""
        if not isinstance(output, torch.Tensor):
            return output
        # A TP style may hand back a DTensor on the tp mesh; its local shard is what we wrap.
        return DTensor.from_local(_to_local(output), self.mesh, self.placements, run_check=False)

    def output_to_local(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook: DTensor outputs become local."""
        return tree_map(_to_local, output)


class PrepareSequenceShards(ParallelStyle):
    """Convert between sequence-sharded DTensors and local shards at a module's boundary.

    Inputs: every DTensor among the positional and keyword inputs becomes its local shard, so the module
    computes on plain tensors (its weights are plain or TP tensors, never on the CP mesh). Output: by
    default the module's tensor output becomes a DTensor on the style's mesh with placements
    :func:`~cp_dtensor.sharding.activation_placements` (Shard(seq_dim) on "cp", and on "tp" under
    sequence parallelism); with ``use_local_output`` (PyTorch's name in its TP styles), DTensor outputs
    become local.

    Args:
        use_local_output: unwrap the output to local tensors (root, final norm) instead of wrapping it as a
            sequence-sharded DTensor (blocks).
        seq_dim: the sequence dim of the output (1 for (B, S, D) hidden states).
        sequence_parallel: the output is also sequence-sharded over "tp" (TP with sequence parallelism).
    """

    def __init__(
        self, *, use_local_output: bool = False, seq_dim: int = 1, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.use_local_output = use_local_output
        self.seq_dim = seq_dim
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        placements = activation_placements(
            device_mesh, self.seq_dim, sequence_parallel=self.sequence_parallel
        )
        hooks = _BoundaryHooks(device_mesh, placements)
        module.register_forward_pre_hook(hooks.inputs_to_local, with_kwargs=True, prepend=True)
        module.register_forward_hook(
            hooks.output_to_local if self.use_local_output else hooks.output_to_dtensor
        )
        return module

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(use_local_output={self.use_local_output}, seq_dim={self.seq_dim}, "
            f"sequence_parallel={self.sequence_parallel})"
        )


class _ModeHooks:
    """The hooks of :class:`ContextParallel`: enter the mode before the forward, leave it after (methods,
    not closures: torch.compile guards them cleanly)."""

    def __init__(self, mode: ContextParallelAttention) -> None:
        self.mode = mode
        self.depth = 0

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook: enter the mode."""
        self.mode.__enter__()
        self.depth += 1

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook (always called, also when the forward raised): leave the mode."""
        if self.depth:
            self.depth -= 1
            self.mode.__exit__(None, None, None)


class ContextParallel(ParallelStyle):
    """Run every ``F.scaled_dot_product_attention`` / :func:`cp_dtensor.document_attention` call inside a
    module's forward as CP attention.

    The module may take anything (``x`` or ``(q, k, v)``) and call SDPA anywhere in its forward: a hook
    enters a :class:`~cp_dtensor.attention.dispatch.ContextParallelAttention` mode bound to the style's
    mesh for the duration of the forward, and the mode treats the plain q, k, v it sees as this rank's
    sequence shards in the settings' layout (Note [SDPA dispatch]). Every call inside must therefore be
    self-attention over the CP-sharded sequence; an explicit ``attn_mask`` or dropout raises.

    One mode object serves every module the style is applied to (:attr:`attention`), so its settings
    and ``stats`` are shared.

    Args:
        settings: layout (as given to :func:`cp_dtensor.shard_batch`), strategy, group size, backend, stats
            (:class:`~cp_dtensor.CPSettings`). The keywords ``layout``, ``comm``, ``backend``, ``stats``,
            ``a2a_size`` build one instead (pass one or the other).
        window_size: ``(left, right)`` sliding window of every SDPA call inside (flash-attn convention,
            -1 = unbounded); one style per window (e.g. local and global layers get two styles).
    """

    def __init__(
        self,
        *,
        settings: CPSettings | None = None,
        layout: LayoutLike | LayoutRule = "zigzag",
        comm: str = "p2p",
        window_size: tuple[int, int] = (-1, -1),
        backend: str | None = None,
        stats: AttentionStats | None = None,
        a2a_size: int | None = None,
    ) -> None:
        super().__init__()
        if settings is None:
            settings = CPSettings(layout=layout, comm=comm, a2a_size=a2a_size, backend=backend, stats=stats)
        elif (layout, comm, backend, stats, a2a_size) != ("zigzag", "p2p", None, None, None):
            raise ValueError(
                "ContextParallel got settings= and also layout/comm/backend/stats/a2a_size keywords; pass one "
                "or the other."
            )
        self.settings = settings
        self.window_size = tuple(window_size)
        self.attention: ContextParallelAttention | None = None
        self._mesh: DeviceMesh | None = None

    def _mode_for(self, device_mesh: DeviceMesh) -> ContextParallelAttention:
        if self.attention is None:
            self._mesh = device_mesh
            self.attention = ContextParallelAttention(
                device_mesh, settings=self.settings, window_size=self.window_size
            )
        elif device_mesh != self._mesh:
            raise ValueError(
                f"One ContextParallel style was applied with two meshes ({self._mesh} and {device_mesh}); "
                f"create one style per mesh."
            )
        return self.attention

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        hooks = _ModeHooks(self._mode_for(device_mesh))
        module.register_forward_pre_hook(hooks.enter, with_kwargs=True)
        module.register_forward_hook(hooks.leave, always_call=True)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"
