"""Context parallelism for a whole model: one ``parallelize_module`` plan of CP styles.

Note [Context-parallel model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
:func:`apply_context_parallel` builds a plan from module-name patterns and applies it with PyTorch's
``parallelize_module`` (Note [Context-parallel styles] for what each style does)::

    shard_batch(global batch, world_mesh["dp", "cp", "tp"])     tokens, labels, positions: DTensors
      |
    model                 ""             PrepareSequenceShards(use_local_output=True)
      blocks              blocks=...     PrepareSequenceShards()     hidden state between blocks: DTensor
        attention         attention=...  ContextParallel(settings)           SDPA inside -> CP attention
      final modules       final=...      PrepareSequenceShards(use_local_output=True)
      |
    logits (B, S_local, V), local; loss on local shards, token count reduced over dp x cp

Only ``attention`` is required: with no ``blocks`` the model computes on local shards throughout and only
attention communicates, which is all any model needs (bring your own model: README). ``blocks`` makes
the hidden state between them a sequence-sharded DTensor; every module that consumes a block's output
must then be a block itself or be listed in ``final``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.sharding import cp_axis_of
from cp_dtensor.styles import ContextParallel, PrepareSequenceShards

__all__ = ["apply_context_parallel", "build_context_parallel_plan"]


def _patterns(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _check_patterns(model: nn.Module, patterns: Sequence[str], what: str) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3) or names[:5]
            raise ValueError(
                f"apply_context_parallel: {what} pattern {pattern!r} matches no module of "
                f"{type(model).__name__}; module names look like {close}. Patterns use fnmatch on dotted "
                f"names, e.g. 'layers.*.attention'."
            )


def _settings(settings: CPSettings | None, keywords: dict[str, Any]) -> CPSettings:
    if settings is not None and keywords:
        raise ValueError(f"Pass settings= or the keywords {sorted(keywords)}, not both.")
    if settings is not None:
        return settings
    defaults = {"layout": "zigzag"}
    return CPSettings(**{**defaults, **keywords})


def build_context_parallel_plan(
    *,
    attention: str | Sequence[str],
    blocks: str | Sequence[str] = (),
    final: str | Sequence[str] = (),
    settings: CPSettings | None = None,
    sequence_parallel: bool = False,
    **setting_keywords: Any,
) -> tuple[dict[str, ParallelStyle], ContextParallel]:
    """The ``parallelize_module`` plan of Note [Context-parallel model], and its attention style.

    Args and patterns as for :func:`apply_context_parallel`.
    """
    attention_style = ContextParallel(settings=_settings(settings, setting_keywords))
    plan: dict[str, ParallelStyle] = {"": PrepareSequenceShards(use_local_output=True)}
    for pattern in _patterns(blocks):
        plan[pattern] = PrepareSequenceShards(sequence_parallel=sequence_parallel)
    for pattern in _patterns(final):
        plan[pattern] = PrepareSequenceShards(use_local_output=True)
    for pattern in _patterns(attention):
        plan[pattern] = attention_style
    return plan, attention_style


def apply_context_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    attention: str | Sequence[str],
    blocks: str | Sequence[str] = (),
    final: str | Sequence[str] = (),
    settings: CPSettings | None = None,
    sequence_parallel: bool = False,
    **setting_keywords: Any,
) -> ContextParallelAttention:
    """Install context parallelism on ``model`` (Note [Context-parallel model]).

    Args:
        model: the root module; its inputs may be DTensors from :func:`cp_dtensor.shard_batch` or local
            shards.
        mesh: the activation mesh: a mesh with a "cp" axis (e.g. ``world_mesh["cp", "tp"]``) or a 1-D CP mesh.
        attention: name pattern(s) (fnmatch on dotted module names, as ``parallelize_module``) of the
            modules whose forward calls ``F.scaled_dot_product_attention``, e.g. ``"layers.*.attention"``.
        blocks: pattern(s) of the repeated blocks whose output becomes a sequence-sharded DTensor.
        final: pattern(s) of modules after the blocks that take the hidden state (e.g. ``"norm"``).
        settings: the CP attention settings (:class:`~cp_dtensor.CPSettings`: the layout the batch is sharded
            with by :func:`cp_dtensor.shard_batch`, strategy, backend, stats); default zigzag p2p.
        sequence_parallel: True when TP runs with sequence parallelism (hidden states also Shard(1) on tp).
        **setting_keywords: ``layout=``, ``comm=``, ``backend=``, ``stats=``, ``a2a_size=`` build the
            settings instead (a convenience; pass one or the other).

    Returns:
        The :class:`ContextParallelAttention` mode holding the CP settings (shared by every attention
        module).
    """
    if not _patterns(attention):
        raise ValueError("apply_context_parallel needs at least one attention module pattern.")
    _check_patterns(model, _patterns(attention), "attention")
    _check_patterns(model, _patterns(blocks), "blocks")
    _check_patterns(model, _patterns(final), "final")
    cp_axis_of(mesh)  # validates the mesh
    plan, attention_style = build_context_parallel_plan(
        attention=attention, blocks=blocks, final=final, settings=_settings(settings, setting_keywords),
        sequence_parallel=sequence_parallel,
    )  # fmt: skip
    parallelize_module(model, mesh, plan)
    assert attention_style.attention is not None
    return attention_style.attention
