"""Apply TP, CP, activation checkpointing and FSDP2 to a model part (torchtitan's order).

``parallelize_llama`` is the plan of the Llama-structured families (``llama3``, ``qwen3``,
``torchtitan.llama3``: their registry entries name it); it knows module names, not model classes, and
``build_parallel_model`` takes a family's parallelize and pipeline-split functions (Note [Model registry]).

Note [Parallelize order]
~~~~~~~~~~~~~~~~~~~~~~~~
::

    TP    first: it replaces weights by tp-sharded DTensors and installs its input/output styles, which the
          later steps must see as the module's own behaviour.
    CP    next: its styles (Note [Context-parallel styles]) convert between local shards and ("cp", "tp")
          DTensors around the TP styles (prepended input hooks, appended output hooks) and run SDPA
          inside attention as the ring op.
    AC    then: checkpoint wrappers re-run the block forward - hooks included - during backward.
    compile  then (optional): each block, wrappers and hooks included, becomes one graph.
    FSDP  last: it shards whatever parameters (plain or TP DTensors) the model ends up with over the
          flattened dp x cp axis: CP ranks hold the same weights, so they shard them like DP ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.context_parallel import apply_context_parallel
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.pipeline import build_pipeline_schedule, split_llama_into_stages, stages_per_rank
from cp_dtensor.styles import PrepareSequenceShards
from cp_dtensor.train_step import PipelineState, TokenMeanLoss

__all__ = [
    "ParallelModel",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "build_parallel_model",
    "parallelize_llama",
]

ACMode = Literal["none", "selective", "full"]


def apply_tp(model: nn.Module, parallel_dims: ParallelDims) -> None:
    """Tensor parallelism with sequence parallelism (torchtitan's Llama plan) over the "tp" axis.

    Heads are sharded over tp (wq/wk/wv column-wise, wo row-wise); norms run sequence-parallel; the
    embedding is row-wise with a sequence-sharded output; logits are replicated over tp. Per-head q/k norms
    (Qwen3) see the local heads of q and k: their weights are replicated over tp and run as
    ``SequenceParallel`` over the head dim (dim 2 of (B, S, H, D)), so their gradient sums over all heads.
    A tied output projection (``args.tie_embeddings``) is tied again after both are sharded alike (vocab
    rows, ``Shard(0)``).
    """
    tp_mesh = parallel_dims.world_mesh["tp"]
    args = model.args
    if args.n_heads % parallel_dims.tp or args.kv_heads % parallel_dims.tp:
        raise ValueError(
            f"tensor_parallel_degree {parallel_dims.tp} must divide n_heads {args.n_heads} and "
            f"n_kv_heads {args.kv_heads} (attention heads are sharded over tp)."
        )
    root_plan = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        root_plan["norm"] = SequenceParallel()
    if model.output is not None:
        root_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True
        )
    parallelize_module(model, tp_mesh, root_plan)
    if (
        getattr(args, "tie_embeddings", False)
        and model.tok_embeddings is not None
        and model.output is not None
    ):
        model.output.weight = model.tok_embeddings.weight  # both Shard(0) over tp: one parameter again
    block_plan = {
        "attention_norm": SequenceParallel(),
        # attention(x, rope, document_ids, positions): only x is sequence-parallel over tp
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    if getattr(args, "qk_norm", False):
        block_plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        block_plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)


def apply_ac(model: nn.Module, mode: ACMode, selective_every: int = 2) -> None:
    """Activation checkpointing of transformer blocks.

    ``full`` recomputes every block in backward; ``selective`` recomputes every ``selective_every``-th
    block (layer-selective, as torchtitan's ``selective_ac_option = "N"``); ``none`` does nothing.
    """
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ValueError(f"Unknown activation checkpoint mode {mode!r}; expected none, selective or full.")
    for i, (name, block) in enumerate(list(model.layers.items())):
        if mode == "full" or i % selective_every == 0:
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` every transformer block in place (``fullgraph=True``: a graph break is an error).

    Runs after TP, CP and activation checkpointing (their hooks and wrappers are traced into the block's
    graph; CP attention is a pair of custom ops, Note [Compiled CP attention]) and before FSDP2, as
    torchtitan does. Blocks of one model share their code, so they share one compiled graph.
    """
    for block in model.layers.values():
        block.compile(fullgraph=True, backend=backend)


def apply_fsdp(
    model: nn.Module, parallel_dims: ParallelDims, *, param_dtype: torch.dtype | None = None
) -> None:
    """FSDP2 over the flattened dp x cp axis: one unit per block, then the root.

    Gradients are *summed* over dp x cp (divide factor 1): the loss is already normalized by the global
    token count, so each rank's gradient is its share of the global mean. Gloo lacks PREMUL_SUM, so the
    reduction is forced to a plain sum.
    """
    mesh = parallel_dims.fsdp_mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = getattr(model, "layers", None)
    blocks = list(layers.values()) if layers is not None else []
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away in backward: keep them unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for module in [*blocks, model]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def parallelize_llama(
    model: nn.Module,
    parallel_dims: ParallelDims,
    *,
    ac_mode: ACMode = "none",
    selective_ac_every: int = 2,
    cp_settings: CPSettings | None = None,
    param_dtype: torch.dtype | None = None,
    compile_backend: str | None = None,
) -> ContextParallelAttention | None:
    """Parallelize ``model`` in place: TP -> CP -> AC -> FSDP2 (see Note [Parallelize order]).

    Args:
        model: a (possibly pipeline-stage) Llama-structured model (``tok_embeddings``, ``layers.*`` with
            ``attention.{wq,wk,wv,wo,sdpa}`` and ``feed_forward.{w1,w2,w3}``, ``norm``, ``output``, ``args``).
        parallel_dims: degrees with a built mesh (:meth:`ParallelDims.build_mesh`).
        ac_mode: ``"none"``, ``"selective"`` or ``"full"`` activation checkpointing.
        selective_ac_every: with ``"selective"``, checkpoint every N-th block.
        cp_settings: how CP attention runs (:class:`~cp_dtensor.CPSettings`: layout, strategy, backend,
            stats); default zigzag p2p.
        param_dtype: FSDP mixed-precision parameter dtype (e.g. ``torch.bfloat16``); None keeps fp32.
        compile_backend: ``torch.compile`` backend of the blocks (``"inductor"``, ``"aot_eager"``), or None
            to run eagerly.

    Returns:
        The :class:`ContextParallelAttention` object when CP is on, else None.
    """
    if parallel_dims.tp_enabled:
        apply_tp(model, parallel_dims)
    cp_attention = None
    if parallel_dims.cp_enabled:
        cp_attention = apply_context_parallel(
            model,
            parallel_dims.activation_mesh,
            # the narrowest module that calls SDPA: our Llama's `sdpa`; torchtitan's adapter names only
            # `attention` (its `sdpa` is a property). Narrow keeps the mode off rotary & projections.
            attention=(
                "layers.*.attention.sdpa"
                if any(name.endswith("attention.sdpa") for name, _ in model.named_modules())
                else "layers.*.attention"
            ),
            blocks="layers.*",
            final="norm" if model.norm is not None else (),
            settings=cp_settings or CPSettings(layout="zigzag"),
            sequence_parallel=parallel_dims.tp_enabled,
        )
    else:  # the model still takes shard_batch's DTensors (cp = 1: whole sequences) as local tensors
        parallelize_module(model, parallel_dims.activation_mesh, PrepareSequenceShards(use_local_output=True))
    apply_ac(model, ac_mode, selective_ac_every)
    if compile_backend is not None:
        apply_compile(model, compile_backend)
    if parallel_dims.fsdp_enabled:
        apply_fsdp(model, parallel_dims, param_dtype=param_dtype)
    return cp_attention


@dataclass
class ParallelModel:
    """A parallelized model as the training loop drives it.

    Attributes:
        model_parts: the whole model, or this pp rank's stage modules.
        pipeline: the pipeline schedule state when pp > 1, else None.
        cp_attention: the CP attention settings object when cp > 1, else None.
    """

    model_parts: list[nn.Module]
    pipeline: PipelineState | None
    cp_attention: ContextParallelAttention | None

    def parameters(self) -> list[nn.Parameter]:
        """All parameters of this rank's parts."""
        return [p for m in self.model_parts for p in m.parameters()]


def build_parallel_model(
    model: nn.Module,
    parallel_dims: ParallelDims,
    *,
    device: torch.device,
    pp_schedule: str = "1F1B",
    pp_microbatches: int = -1,
    parallelize_fn: Callable[..., ContextParallelAttention | None] = parallelize_llama,
    pipeline_split_fn: Callable[..., list[tuple[int, nn.Module]]] | None = split_llama_into_stages,
    **parallelize_kwargs: Any,
) -> ParallelModel:
    """Split into pipeline stages when pp > 1, then parallelize every part.

    Args:
        model: the whole model (on the meta device, or with initialized weights identical on every rank).
        parallel_dims: degrees with a built mesh.
        device: the device the model lives on.
        pp_schedule: pipeline schedule name (``"1F1B"``, ``"GPipe"``, ``"Interleaved1F1B"``).
        pp_microbatches: microbatches per step; -1 means one per pipeline stage.
        parallelize_fn: the model family's parallelize function (``ModelSpec.parallelize``); the default
            serves Llama-structured models.
        pipeline_split_fn: the family's stage split (``ModelSpec.pipeline_split``); None: the family cannot
            be pipelined.
        **parallelize_kwargs: forwarded to ``parallelize_fn``.

    Raises:
        ValueError: pp > 1 for a family without a pipeline split.
    """
    if not parallel_dims.pp_enabled:
        cp_attention = parallelize_fn(model, parallel_dims, **parallelize_kwargs)
        return ParallelModel([model], None, cp_attention)
    if pipeline_split_fn is None:
        raise ValueError(
            f"pipeline_parallel_degree {parallel_dims.pp}: this model family ({type(model).__name__}) has no "
            f"pipeline split; set parallelism.pipeline_parallel_degree = 1."
        )
    per_rank = stages_per_rank(pp_schedule)
    stages = pipeline_split_fn(model, parallel_dims, per_rank)
    cp_attention = None
    for _, stage in stages:
        cp_attention = parallelize_fn(stage, parallel_dims, **parallelize_kwargs) or cp_attention
    n_stages = parallel_dims.pp * per_rank
    loss_fn = TokenMeanLoss()
    schedule = build_pipeline_schedule(
        stages,
        parallel_dims,
        schedule=pp_schedule,
        n_microbatches=pp_microbatches if pp_microbatches > 0 else n_stages,
        loss_fn=loss_fn,
        device=device,
    )
    ids = [idx for idx, _ in stages]
    pipeline = PipelineState(
        schedule=schedule,
        loss_fn=loss_fn,
        mesh=parallel_dims.world_mesh["pp"],
        has_first_stage=0 in ids,
        has_last_stage=n_stages - 1 in ids,
    )
    return ParallelModel([m for _, m in stages], pipeline, cp_attention)
