"""Pipeline parallelism: split a Llama-structured model into stages and build a ``torch.distributed.pipelining`` schedule.

Note [Pipeline stages with CP]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each pp rank keeps a copy of the model with only its stages' blocks (torchtitan style: delete the other
``layers`` entries, drop ``tok_embeddings`` on later stages and ``norm``/``output`` on earlier ones).
Every stage is then parallelized like a whole model (TP -> CP -> AC -> FSDP), so the hidden state that
crosses a stage boundary is this rank's *local* sequence shard (B_mb, S / (cp x tp), D) - CP and TP ranks
of neighbouring stages line up one to one - and positions reach every stage as a keyword argument::

    pp rank 0 (stage 0)                  pp rank 1 (stage 1)
    tokens, positions -> emb, blocks 0-1 --h-->  blocks 2-3, norm, output -> loss(logits, labels)

Microbatches split the batch dimension only; the sequence sharding is untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    get_schedule_class,
)

from cp_dtensor.parallel_dims import ParallelDims

__all__ = ["build_pipeline_schedule", "split_llama_into_stages", "stage_ids_for_rank", "stages_per_rank"]


def stages_per_rank(schedule: str) -> int:
    """Stages each pp rank holds under ``schedule``: 2 for multi-stage (looped/interleaved) schedules, else 1.

    The one home of this rule: validation, stage splitting and the planner all ask here. Decided by the
    schedule's class in ``torch.distributed.pipelining``, not by its name.
    """
    try:
        schedule_class = get_schedule_class(schedule)
    except ValueError as e:
        raise ValueError(f"Unknown pipeline schedule {schedule!r}: {e}") from None
    return 2 if issubclass(schedule_class, PipelineScheduleMulti) else 1


def stage_ids_for_rank(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Stage indices of ``pp_rank``: loop-style, rank r holds stages r, r + pp, r + 2pp, ..."""
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def _split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    if n_stages > n_layers:
        raise ValueError(
            f"Cannot split {n_layers} transformer blocks into {n_stages} pipeline stages; use "
            f"pipeline_parallel_degree x stages per rank <= {n_layers}."
        )
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        bounds.append(list(range(start, start + size)))
        start += size
    return bounds


def split_llama_into_stages(
    model: nn.Module, parallel_dims: ParallelDims, stages_per_rank: int = 1
) -> list[tuple[int, nn.Module]]:
    """This pp rank's ``(stage_index, stage_module)`` pairs, each a pruned deep copy of ``model``.

    The split of Llama-structured models (``tok_embeddings``, ``layers``, ``norm``, ``output``).

    Raises:
        ValueError: The model ties its output projection to its embedding (``args.tie_embeddings``): the
            two would sit on different stages.
    """
    if getattr(getattr(model, "args", None), "tie_embeddings", False):
        raise ValueError(
            "this model ties its output projection to its token embedding (tie_word_embeddings), which pipeline "
            "stages would split apart; set parallelism.pipeline_parallel_degree = 1 (use dp, cp or tp)."
        )
    pp, pp_rank = parallel_dims.pp, parallel_dims.world_mesh.get_local_rank("pp")
    n_stages = pp * stages_per_rank
    layer_ids = _split_layers(len(model.layers), n_stages)
    stages = []
    for stage_idx in stage_ids_for_rank(pp_rank, pp, stages_per_rank):
        stage = copy.deepcopy(model)
        keep = {str(i) for i in layer_ids[stage_idx]}
        for name in list(stage.layers.keys()):
            if name not in keep:
                del stage.layers[name]
        if stage_idx > 0:
            stage.tok_embeddings = None
        if stage_idx < n_stages - 1:
            stage.norm = None
            stage.output = None
        stages.append((stage_idx, stage))
    return stages


def build_pipeline_schedule(
    stage_modules: list[tuple[int, nn.Module]],
    parallel_dims: ParallelDims,
    *,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """A pipelining schedule (``"1F1B"``, ``"GPipe"``, ``"Interleaved1F1B"``, ...) over this rank's stages.

    ``loss_fn(output, target)`` must already be normalized for the whole global batch (gradient scaling
    by the number of microbatches is switched off).
    """
    pp = parallel_dims.pp
    n_stages = pp * len(stage_modules)
    group = parallel_dims.world_mesh.get_group("pp")
    stages = [PipelineStage(m, idx, n_stages, device, group=group) for idx, m in stage_modules]
    try:
        schedule_class = get_schedule_class(schedule)
    except ValueError as e:
        raise ValueError(f"Unknown pipeline schedule {schedule!r}: {e}") from None
    if issubclass(schedule_class, PipelineScheduleSingle):
        if len(stages) != 1:
            raise ValueError(f"Schedule {schedule!r} runs one stage per rank, got {len(stages)}.")
        return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
