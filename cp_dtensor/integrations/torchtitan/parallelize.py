"""The train spec's parallelize function: torchtitan's Llama 3 parallelisms with cp_dtensor's CP.

Note [cp_dtensor CP in torchtitan's parallelize]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torchtitan's ``parallelize_llama`` and :func:`parallelize_llama` here differ in the CP step only; every
other step calls torchtitan's own function::

    torchtitan.models.llama3.infra.parallelize    cp_dtensor.integrations.torchtitan.parallelize
      assert seq_len % (tp * 2 * cp) == 0           seq_len_problem(..., layout) -> ValueError
      apply_tp                                      apply_tp
      apply_cp_to_attention_module                  apply_cp_dtensor: parallelize_module(model, cp_mesh,
        (PyTorch's experimental CP: global            {"layers.*.attention.inner_attention": ContextParallel})
         SDPA dispatcher, no CPU kernel)
      apply_ac, apply_compile                       apply_ac, apply_compile (CP attention = custom ops inside
                                                    each compiled block; refused together with TP)
      apply_fsdp over "fsdp" = dp_shard x cp        apply_fsdp (+ plain-sum reduce-scatter on gloo)
        or apply_ddp                                  or apply_ddp

torchtitan's trainer has already cut tokens, labels and positions into this rank's sequence shard
(``post_dataloading_process``, with the "headtail" load balancer: rank r holds chunks r and 2cp-1-r of
2cp, cp_dtensor's "zigzag" layout). So every module runs on local shards, and only SDPA needs the other
ranks' keys and values. Under the :class:`~cp_dtensor.styles.ContextParallel` style each
``inner_attention`` (torchtitan's ``ScaledDotProductAttentionWrapper``) does::

    pre-hook    enter ContextParallelAttention(cp_mesh, layout, comm, backend)
    forward     F.scaled_dot_product_attention(q, k, v)   q, k, v local (B, H, S/cp, D) in `layout`
                  -> cp_dtensor ring op over "cp" (p2p ring overlapped with compute, or all-gather)
                  -> out local (B, H, S/cp, D)
    post-hook   leave the mode

``block_causal`` flavors (Note [block_causal with cp_dtensor]) get the same style on their
``inner_attention`` (a ``DocumentCausalAttention``): its ``cp_dtensor.document_attention(q, k, v,
document_ids, positions)`` call becomes the masked ring, with the positions checked against the layout.

PyTorch's experimental CP is never switched on and ``F.scaled_dot_product_attention`` is never patched.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.config import JobConfig as TorchtitanJobConfig
from torchtitan.distributed import ParallelDims as TorchtitanParallelDims
from torchtitan.distributed.tensor_parallel import maybe_enable_async_tp
from torchtitan.models.llama3.infra import parallelize as tt_parallelize
from torchtitan.tools.logging import logger

from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.integrations.torchtitan.config import cp_dtensor_config
from cp_dtensor.integrations.torchtitan.cpu_shims import force_sum_reduction_on_gloo
from cp_dtensor.integrations.torchtitan.documents import DocumentCausalAttention, uses_document_ids
from cp_dtensor.parallel_dims import seq_len_problem
from cp_dtensor.styles import ContextParallel

__all__ = ["ATTENTION_MODULES", "apply_cp_dtensor", "cp_layout_for_load_balancer", "parallelize_llama"]

ATTENTION_MODULES = "layers.*.attention.inner_attention"
"""``parallelize_module`` pattern of torchtitan's SDPA wrappers, the modules that call SDPA."""


def cp_layout_for_load_balancer(load_balancer: str | None) -> str:
    """cp_dtensor's layout for torchtitan's ``parallelism.context_parallel_load_balancer``.

    torchtitan shards inputs, labels and positions before the forward; the ring must assume the same
    layout. "headtail" gives rank r the chunks r and 2cp-1-r of 2cp, in increasing order: our "zigzag".

    Raises:
        ValueError: for "ptrr" (FlexAttention only) or an unknown name.
    """
    if load_balancer == "headtail":
        return "zigzag"
    if load_balancer is None or load_balancer.lower() == "none":
        return "contiguous"
    raise ValueError(
        f"parallelism.context_parallel_load_balancer = {load_balancer!r} is not supported with "
        f'cp_dtensor (SDPA attention): use "headtail" (cp_dtensor layout "zigzag") or none ("contiguous").'
    )


def apply_cp_dtensor(
    model: nn.Module,
    cp_mesh: DeviceMesh,
    *,
    settings: CPSettings | None = None,
) -> ContextParallelAttention:
    """Context parallelism on a torchtitan Llama 3 whose inputs are already sequence shards.

    Applies one :class:`~cp_dtensor.styles.ContextParallel` style to every :data:`ATTENTION_MODULES`
    with ``parallelize_module`` (Note [cp_dtensor CP in torchtitan's parallelize]).

    Args:
        model: torchtitan's Llama 3 ``Transformer`` (or a pipeline stage of it), with SDPA attention or, for
            ``block_causal`` flavors, cp_dtensor's document attention (:class:`SeededLlama3` builds it).
        cp_mesh: the 1-D mesh of the CP ranks, axis named "cp".
        settings: the CP attention settings (:class:`~cp_dtensor.CPSettings`); ``layout`` must be the one the
            inputs were sharded with (:func:`cp_layout_for_load_balancer`); default zigzag p2p.

    Returns:
        The :class:`~cp_dtensor.attention.dispatch.ContextParallelAttention` mode holding the settings,
        shared by every attention module.

    Raises:
        ValueError: a flavor that is neither SDPA nor block_causal, a block_causal model
            whose attention is not cp_dtensor's document attention, or a mesh that is not 1-D.
    """
    model_args = getattr(model, "model_args", None)
    attn_type = getattr(model_args, "attn_type", "sdpa")
    if attn_type != "sdpa" and not uses_document_ids(model_args):
        raise ValueError(
            f"cp_dtensor context parallelism serves SDPA attention and torchtitan's block_causal flavors; the "
            f"model flavor has attn_type {attn_type!r} with attn_mask_type "
            f"{getattr(model_args, 'attn_mask_type', None)!r}. Pick an SDPA flavor (e.g. debugmodel, 8B, 70B) "
            f"or a block_causal one (e.g. debugmodel_flex_attn, 8B_varlen)."
        )
    if uses_document_ids(model_args):
        inner = [block.attention.inner_attention for block in model.layers.values()]
        if not all(isinstance(m, DocumentCausalAttention) for m in inner):
            raise ValueError(
                f"{type(model).__name__} has the block_causal mask but attends with "
                f"{sorted({type(m).__name__ for m in inner})}, which cp_dtensor's CP cannot serve; build it as "
                f"SeededLlama3 (the train spec's model) or call apply_document_attention(model) first."
            )
    if cp_mesh.ndim != 1:
        raise ValueError(f"cp_mesh must be the 1-D mesh of the CP ranks, got axes {cp_mesh.mesh_dim_names}.")
    style = ContextParallel(settings=settings or CPSettings(layout="zigzag"))
    parallelize_module(model, cp_mesh, {ATTENTION_MODULES: style})
    if style.attention is None:  # parallelize_module only warns when a pattern matches nothing
        raise ValueError(f"{type(model).__name__} has no module matching {ATTENTION_MODULES!r}.")
    return style.attention


def parallelize_llama(
    model: nn.Module, parallel_dims: TorchtitanParallelDims, job_config: TorchtitanJobConfig
) -> nn.Module:
    """The train spec's parallelize function: torchtitan's TP -> CP -> AC -> compile -> FSDP/DDP.

    The one copy of torchtitan's ``parallelize_llama`` orchestration: each step calls torchtitan's own
    ``apply_tp`` / ``apply_ac`` / ``apply_compile`` / ``apply_fsdp`` / ``apply_ddp`` with the arguments
    torchtitan passes, except CP, which is :func:`apply_cp_dtensor`.

    torchtitan's function itself cannot be called: with ``context_parallel_degree > 1`` it applies
    PyTorch's experimental CP (``apply_cp_to_attention_module``), which switches on a module-global SDPA
    dispatcher for every DTensor SDPA call and has no CPU kernel (the run stops in DTensor with "Operator
    aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
    registered"). Hiding CP from it (``cp_enabled`` False) is no way out: torchtitan wraps the model in
    FSDP only when ``fsdp_enabled`` (``dp_shard > 1 or cp > 1``), so with CP alone no data parallelism
    would reduce gradients, and the CP ranks' gradients - each from its own sequence shard - would
    never be summed.

    Raises:
        ValueError: a sequence length the degrees cannot split, an unsupported load balancer or a
            flavor that is neither SDPA nor block_causal under CP, or torch.compile together with TP and CP.
    """
    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    balancer = job_config.parallelism.context_parallel_load_balancer
    layout = cp_layout_for_load_balancer(balancer) if parallel_dims.cp_enabled else "contiguous"
    problem = seq_len_problem(
        job_config.training.seq_len, cp=parallel_dims.cp, tp=parallel_dims.tp, layout=layout,
        name="training.seq_len",
    )  # fmt: skip
    if problem:
        raise ValueError(problem)
    if parallel_dims.cp_enabled and compile_enabled and parallel_dims.tp_enabled:
        raise ValueError(
            "torch.compile together with tensor and context parallelism is not supported yet: compiled TP "
            "blocks give other gradients than eager ones or fail in backward with this torch (with or without "
            "CP); set compile.enable = false, or tensor_parallel_degree = 1 to compile with CP."
        )

    if parallel_dims.tp_enabled:
        float8 = "float8" in job_config.model.converters
        rowwise = job_config.quantize.linear.float8.recipe_name in ("rowwise", "rowwise_with_gw_hp")
        tp_mesh = parallel_dims.get_mesh("tp")
        tt_parallelize.apply_tp(
            model,
            tp_mesh,
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            enable_float8_tensorwise_tp=float8 and not rowwise,
            cp_enabled=parallel_dims.cp_enabled,
        )
        maybe_enable_async_tp(job_config, tp_mesh)

    if parallel_dims.cp_enabled:
        config = cp_dtensor_config(job_config)
        try:
            settings = CPSettings(
                layout=layout,
                comm=config.comm,
                backend=config.backend or None,
                a2a_size=config.a2a_size or None,
            )
        except ValueError as e:
            raise ValueError(f"cp_dtensor settings: {e}") from None
        apply_cp_dtensor(model, parallel_dims.get_mesh("cp"), settings=settings)
        logger.info(
            f"Applied cp_dtensor context parallelism (cp {parallel_dims.cp}, layout {settings.layout}, "
            f"comm {settings.comm}) to {len(model.layers)} attention modules"
        )

    if job_config.activation_checkpoint.mode != "none":
        tt_parallelize.apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_enabled,
            op_sac_save_list=tt_parallelize._op_sac_save_list,  # torchtitan's own list (module-private)
            base_folder=job_config.job.dump_folder,
        )
    if compile_enabled:
        tt_parallelize.apply_compile(model, job_config.compile)

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        tt_parallelize.apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        force_sum_reduction_on_gloo(model)
    elif parallel_dims.dp_replicate_enabled:
        dp_mesh = parallel_dims.get_mesh("dp_replicate")
        if parallel_dims.world_size != dp_mesh.size():
            raise RuntimeError("DDP does not support > 1D parallelism")
        tt_parallelize.apply_ddp(model, dp_mesh, enable_compile=compile_enabled)
    return model
