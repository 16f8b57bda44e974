"""torchtitan with cp_dtensor: its trainer with our ring attention, and its Llama 3 model in our trainer.

Needs the extra: ``pip install "cp_dtensor[torchtitan]"`` (torchtitan >= 0.2.2, < 0.3: the last line with
TOML job configs). Nothing in torchtitan's installed files is edited.

Note [torchtitan integration]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torchtitan picks everything model-specific from a *train spec* named by ``[model] name``. This module
registers ``"cp_dtensor.llama3"``: torchtitan's own Llama 3 spec (model code, flavors, pipelining, optimizer,
LR schedule, loss, validator, HF checkpoint adapter) with these parts replaced::

    torchrun ... -m cp_dtensor.integrations.torchtitan --job.config_file X.toml
      CPU only: stub the triton-only MoE kernels, point torchtitan's device at the CPU (CPU fixes 1, 2)
      torchtitan.train.Trainer  (unchanged)
        post_dataloading_process   tokens, labels, positions -> local shards, "headtail" load balancer
                                   (rank r holds chunks r and 2cp-1-r: cp_dtensor's "zigzag" layout)
        train_spec "cp_dtensor.llama3"
          model_cls, model_args    SeededLlama3: torchtitan's Transformer; with debug.seed set, every
                                   parameter is drawn whole from its own (seed, name) generator and sliced,
                                   so any degrees give the same initial weights (DTensor's RNG is CUDA-only)
          parallelize_fn           = parallelize_llama below: torchtitan's TP -> CP -> AC -> compile ->
                                     FSDP, with CP = cp_dtensor hooks on every attention.inner_attention
                                     instead of torchtitan's apply_cp_to_attention_module; FSDP sums
                                     gradients without PREMUL_SUM on gloo (CPU fix 3)
          build_dataloader_fn      synthetic recall / local text (no download), else torchtitan's HF loader
          build_tokenizer_fn       None for those two, else torchtitan's HF tokenizer
          build_metrics_processor  torchtitan's, plus one JSON line per logged step (cp_dtensor.log_file)
      model forward, inside each attention.inner_attention (ScaledDotProductAttentionWrapper):
        pre-hook   q, k, v local (B, H, S/cp, D) -> DTensor Shard(2) on the "cp" mesh; enter the
                   ContextParallelAttention mode (settings on the object: layout, comm, backend)
        F.scaled_dot_product_attention -> cp_dtensor ring op (p2p ring, overlapped; or all-gather)
        post-hook  DTensor out -> local; leave the mode

So torchtitan's PyTorch-experimental CP (its module-global dispatcher and rotate method, no CPU kernel) is
never switched on, and ``F.scaled_dot_product_attention`` is never patched.

The other direction: :class:`TorchtitanLlama3` is torchtitan's Llama 3 ``Transformer`` with the forward
signatures of cp_dtensor's model (``model(tokens, positions)``, ``block(x, rope)``, ``attention(x, rope)``,
``attention.sdpa``), so :func:`cp_dtensor.parallelize.build_parallel_model` and cp_dtensor's trainer
(``[model] name = "torchtitan.llama3"``) drive it like their own model::

    cp_dtensor trainer -> TorchtitanLlama3 (torchtitan's modules and parameter names, unchanged)
      forward(tokens, positions)     rope = freqs_cis[positions]  (S_local, head_dim / 2) complex64
        block(x, rope)               x + attention(attention_norm(x), rope); + feed_forward(ffn_norm(h))
          attention(x, rope)         torchtitan's Attention.forward(x, rope, attention_masks=None)
            attention.sdpa           = attention.inner_attention: cp_dtensor's CP hooks go here

CPU fixes (fixes 2 and 3 are applied only without an accelerator / with gloo, fix 1 whenever triton is
missing, fix 4 whenever ``debug.seed`` is set; they touch torchtitan module attributes, never torch):

1. ``import torchtitan`` imports its MoE token-permutation kernels, which ``import triton`` at module level
   (triton, a GPU kernel compiler, does not come with the CPU build of torch). :func:`_stub_moe_kernels_without_triton` puts a placeholder module for
   ``torchtitan.models.moe.kernels`` in ``sys.modules`` first; it raises if an MoE model ever calls it.
2. torchtitan picks its device as ``_get_available_device_type() or "cuda"``, i.e. CUDA on a CPU machine,
   and bound ``device_type`` / ``device_module`` into several modules at import.
   :func:`configure_torchtitan_for_cpu` sets them to ``"cpu"`` and a small stand-in for the ``torch.cuda``
   calls torchtitan makes (device name and memory, peak RSS as the memory peak).
3. gloo has no ``ReduceOp.PREMUL_SUM``; FSDP's gradient reduce-scatter is forced to a plain sum
   (``set_force_sum_reduction_for_comms``), which is exact here because torchtitan sets the divide factor
   to 1 (the loss is already normalized by the global token count).
4. DTensor's RNG supports CUDA-like devices only: on CPU torchtitan's init gives every FSDP shard the same
   random numbers (shard 0 == shard 1). :class:`SeededLlama3` draws each parameter whole from a (seed,
   name) generator and slices it whenever ``debug.seed`` is set, on any device, so that the initial weights
   do not depend on the parallel degrees.
"""

# The triton stub (CPU fix 1) must be in place before torchtitan is first imported, hence the imports below
# the function that installs it.
# ruff: noqa: E402

import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import resource
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

_MOE_KERNELS = "torchtitan.models.moe.kernels"
_EXTRA_HINT = 'pip install "cp_dtensor[torchtitan]"  (torchtitan>=0.2.2,<0.3)'


def _stub_moe_kernels_without_triton() -> None:
    """CPU fix 1: make ``import torchtitan`` work without triton (see the module docstring).

    torchtitan 0.2.x imports ``torchtitan.models.moe.kernels`` (``import triton`` at module level) from its
    package ``__init__`` through the float8/MX converters. Only MoE models with expert parallelism call it.
    """
    if _MOE_KERNELS in sys.modules or importlib.util.find_spec("torchtitan") is None:
        return  # already imported (or stubbed), or torchtitan is missing (the import below says so)
    if importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(_MOE_KERNELS, "cp_dtensor placeholder: triton is not installed.")

    def generate_permute_indices(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "torchtitan's MoE token-permutation kernel needs triton, which is not installed; "
            "cp_dtensor's torchtitan integration serves dense Llama 3 only."
        )

    stub.generate_permute_indices = generate_permute_indices  # type: ignore[attr-defined]
    sys.modules[_MOE_KERNELS] = stub


_stub_moe_kernels_without_triton()

try:
    import torchtitan
    import torchtitan.components.metrics as tt_metrics
    import torchtitan.protocols.train_spec as tt_train_spec
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.config import JobConfig as TTJobConfig
    from torchtitan.distributed import ParallelDims as TTParallelDims
    from torchtitan.distributed.activation_checkpoint import apply_ac as tt_apply_ac
    from torchtitan.distributed.tensor_parallel import maybe_enable_async_tp
    from torchtitan.models import llama3 as tt_llama3
    from torchtitan.models.llama3.infra import parallelize as tt_parallelize
    from torchtitan.models.llama3.model import model as tt_model
    from torchtitan.tools.logging import logger as tt_logger
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"cp_dtensor.integrations.torchtitan needs torchtitan: {_EXTRA_HINT}. ({e})") from e

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.attention.ring import COMM_MODES
from cp_dtensor.data import GlobalBatchLoader, SyntheticRecallDataset, TextDataset
from cp_dtensor.models.llama import ModelArgs
from cp_dtensor.styles import ContextParallel

__all__ = [
    "TRAIN_SPEC_NAME",
    "CPDTensorConfig",
    "GlobalBatchDataLoader",
    "JobConfig",
    "Llama3Args",
    "SeededLlama3",
    "TorchtitanLlama3",
    "apply_cp_dtensor",
    "build_dataloader",
    "build_metrics_processor",
    "build_tokenizer",
    "build_torchtitan_llama3",
    "configure_torchtitan_for_cpu",
    "cp_layout_for_load_balancer",
    "get_train_spec",
    "main",
    "parallelize_llama",
    "register_train_spec",
    "torchtitan_llama3_args",
]

TRAIN_SPEC_NAME = "cp_dtensor.llama3"
"""``[model] name`` of torchtitan's Llama 3 with cp_dtensor's context parallelism."""

_SUPPORTED = ((0, 2, 2), (0, 3, 0))  # [min, max) torchtitan version


def _check_version() -> None:
    parts = []
    for piece in torchtitan.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    version = tuple(parts)
    if version != (0, 0, 0) and not (_SUPPORTED[0] <= version < _SUPPORTED[1]):
        raise ImportError(
            f"cp_dtensor.integrations.torchtitan supports torchtitan >=0.2.2,<0.3 (TOML configs, train-spec "
            f"registry); found {torchtitan.__version__}. {_EXTRA_HINT}"
        )


_check_version()


# --------------------------------------------------------------------------------------------------------
# CPU fix 2: torchtitan's device on a machine without an accelerator
# --------------------------------------------------------------------------------------------------------


class _CpuDeviceModule:
    """The subset of the ``torch.cuda`` API that torchtitan 0.2.x calls, answered for the CPU.

    Memory "peaks" are the process's max RSS (Linux reports KiB); the capacity is the physical memory.
    """

    @staticmethod
    def set_device(device: Any) -> None:
        """No-op: there is one CPU device."""

    @staticmethod
    def current_device() -> int:
        """Index 0 (``torch.distributed.barrier(device_ids=[...])`` needs an int)."""
        return 0

    @staticmethod
    def device_count() -> int:
        """One CPU device."""
        return 1

    @staticmethod
    def is_available() -> bool:
        """Always available."""
        return True

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """No-op: CPU ops are synchronous."""

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        """The processor name, or "cpu"."""
        return platform.processor() or "cpu"

    @staticmethod
    def get_device_properties(device: Any = None) -> types.SimpleNamespace:
        """An object with ``total_memory`` (bytes of physical memory)."""
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(total_memory=total, name=_CpuDeviceModule.get_device_name())

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        """No-op: max RSS cannot be reset."""

    @staticmethod
    def empty_cache() -> None:
        """No-op: no caching allocator."""

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        """Peak memory as the allocator keys torchtitan reads."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }


# Modules of torchtitan 0.2.x that bind `device_type` / `device_module` from torchtitan.tools.utils at import.
_DEVICE_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.components.metrics",
    "torchtitan.tools.profiling",
)


def configure_torchtitan_for_cpu() -> None:
    """CPU fix 2: make torchtitan's trainer use the CPU and gloo (see the module docstring).

    Call it before building torchtitan's ``Trainer`` when ``torch.accelerator.is_available()`` is False;
    :func:`main` does. It sets the module attributes ``device_type = "cpu"`` and ``device_module`` (a
    stand-in for the ``torch.cuda`` calls torchtitan makes) where torchtitan bound them at import.
    """
    for name in _DEVICE_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = _CpuDeviceModule


# --------------------------------------------------------------------------------------------------------
# Config: the [cp_dtensor] section (torchtitan's `job.custom_config_module` extension point)
# --------------------------------------------------------------------------------------------------------


@dataclass
class CPDTensorConfig:
    """Settings of cp_dtensor's context parallelism under torchtitan (``[cp_dtensor]`` TOML section).

    The sequence layout is not set here: it follows torchtitan's
    ``parallelism.context_parallel_load_balancer``, which shards the inputs ("headtail" -> "zigzag",
    none -> "contiguous"). ``parallelism.context_parallel_rotate_method`` belongs to PyTorch's experimental
    CP and is not used.
    """

    comm: Literal["p2p", "allgather"] = "p2p"
    """How CP ranks exchange keys/values: "p2p" ring passes overlapped with compute, or one "allgather"."""

    backend: str = ""
    """Attention kernel adapter of the ring op; "" chooses from the device and dtype."""

    log_file: str = "train_log.jsonl"
    """The metrics rank appends one JSON line per logged step here (relative to job.dump_folder); "" = off."""


@dataclass
class JobConfig:
    """torchtitan JobConfig extension: ``[job] custom_config_module = "cp_dtensor.integrations.torchtitan"``."""

    cp_dtensor: CPDTensorConfig = field(default_factory=CPDTensorConfig)
    """[cp_dtensor] section."""


def _cp_config(job_config: TTJobConfig) -> CPDTensorConfig:
    """The [cp_dtensor] section, or its defaults when the job config was not extended."""
    config = getattr(job_config, "cp_dtensor", None)
    return config if config is not None else CPDTensorConfig()


# --------------------------------------------------------------------------------------------------------
# Context parallelism and the parallelize function of the train spec
# --------------------------------------------------------------------------------------------------------


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
    layout: str = "zigzag",
    comm: str = "p2p",
    backend: str | None = None,
) -> ContextParallelAttention:
    """Context parallelism on a torchtitan Llama 3 whose inputs are already sequence shards.

    Hooks every ``layers.*.attention.inner_attention`` (torchtitan's SDPA wrapper): its q, k, v become
    DTensors ``Shard(2)`` on ``cp_mesh`` and, inside a :class:`ContextParallelAttention` mode, SDPA runs
    cp_dtensor's ring op; the output goes back to a local shard. Every other module runs on local shards,
    as under torchtitan's own CP.

    Args:
        model: torchtitan's Llama 3 ``Transformer`` (or a pipeline stage of it), with SDPA attention.
        cp_mesh: the 1-D mesh of the CP ranks, axis named "cp".
        layout: the layout the inputs were sharded with (:func:`cp_layout_for_load_balancer`).
        comm: ``"p2p"`` or ``"allgather"``.
        backend: ring kernel adapter, or None to choose from device and dtype.

    Returns:
        The :class:`ContextParallelAttention` object holding the settings.
    """
    if comm not in COMM_MODES:
        raise ValueError(f"cp_dtensor.comm = {comm!r}; expected one of {COMM_MODES}.")
    attn_type = getattr(getattr(model, "model_args", None), "attn_type", "sdpa")
    if attn_type != "sdpa":
        raise ValueError(
            f"cp_dtensor context parallelism serves SDPA attention; the model flavor has attn_type "
            f"{attn_type!r}. Pick an SDPA flavor (e.g. debugmodel, 8B, 70B)."
        )
    if cp_mesh.ndim != 1:
        raise ValueError(f"cp_mesh must be the 1-D mesh of the CP ranks, got axes {cp_mesh.mesh_dim_names}.")
    style = ContextParallel(layout=layout, comm=comm, backend=backend)
    for block in model.layers.values():
        style._apply(block.attention.inner_attention, cp_mesh)
    assert style.attention is not None
    return style.attention


def _force_sum_reduction_on_gloo(model: nn.Module) -> None:
    """CPU fix 3: FSDP reduce-scatters with a plain sum when the backend is gloo (no PREMUL_SUM)."""
    if dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def parallelize_llama(model: nn.Module, parallel_dims: TTParallelDims, job_config: TTJobConfig) -> nn.Module:
    """The train spec's parallelize function: torchtitan's Llama 3 order with cp_dtensor's CP.

    Same steps and options as ``torchtitan.models.llama3.infra.parallelize.parallelize_llama`` (TP with
    sequence parallel and loss parallel, activation checkpointing, per-block compile, FSDP/HSDP or DDP),
    except that CP is :func:`apply_cp_dtensor` instead of torchtitan's ``apply_cp_to_attention_module``.

    Raises:
        ValueError: for a sequence length the degrees cannot split, a non-SDPA flavor or an unsupported
            load balancer under CP, or torch.compile together with CP.
    """
    seq_len = job_config.training.seq_len
    if seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(
            f"training.seq_len {seq_len} must be a multiple of {parallel_dims.seq_len_divisor} "
            f"(tensor_parallel_degree {parallel_dims.tp} x 2 x context_parallel_degree {parallel_dims.cp})."
        )
    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if parallel_dims.cp_enabled and compile_enabled:
        raise ValueError(
            "torch.compile of the model is not supported together with cp_dtensor context parallelism "
            "(its hooks and ring communication are not traceable with fullgraph=True); set compile.enable = "
            "false or drop 'model' from compile.components."
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
        config = _cp_config(job_config)
        cp_attention = apply_cp_dtensor(
            model,
            parallel_dims.get_mesh("cp"),
            layout=cp_layout_for_load_balancer(job_config.parallelism.context_parallel_load_balancer),
            comm=config.comm,
            backend=config.backend or None,
        )
        tt_logger.info(
            f"Applied cp_dtensor context parallelism (cp {parallel_dims.cp}, layout {cp_attention.layout}, "
            f"comm {cp_attention.comm}) to {len(model.layers)} attention modules"
        )

    if job_config.activation_checkpoint.mode != "none":
        tt_apply_ac(
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
        _force_sum_reduction_on_gloo(model)
    elif parallel_dims.dp_replicate_enabled:
        dp_mesh = parallel_dims.get_mesh("dp_replicate")
        if parallel_dims.world_size != dp_mesh.size():
            raise RuntimeError("DDP does not support > 1D parallelism")
        tt_parallelize.apply_ddp(model, dp_mesh, enable_compile=compile_enabled)
    return model


# --------------------------------------------------------------------------------------------------------
# Data, tokenizer and metrics of the train spec
# --------------------------------------------------------------------------------------------------------

_LOCAL_DATASETS = ("synthetic_recall", "text")


class GlobalBatchDataLoader(BaseDataLoader):
    """torchtitan data loader over cp_dtensor's deterministic global batches (nothing is downloaded).

    Every ``next`` yields this data-parallel rank's ``local_batch_size`` rows of the next global batch of
    ``local_batch_size x dp_world_size`` rows, as torchtitan expects: ``({"input": tokens}, labels)``, both
    (B, S) int64, labels -100 where no loss is taken. Batches depend only on (dataset, seed, batch index),
    so runs with different parallel degrees but the same global batch see the same data.

    Args:
        dataset: a cp_dtensor map-style dataset (``SyntheticRecallDataset``, ``TextDataset``).
        local_batch_size: rows per rank and microbatch.
        dp_rank, dp_world_size: this rank's position on torchtitan's "batch" mesh.
        seed: shuffling seed.
    """

    def __init__(
        self, dataset: Any, *, local_batch_size: int, dp_rank: int, dp_world_size: int, seed: int
    ) -> None:
        self.loader = GlobalBatchLoader(dataset, local_batch_size * dp_world_size, seed=seed)
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            batch = next(self.loader)
            rows = batch["tokens"].shape[0] // self.dp_world_size
            mine = slice(self.dp_rank * rows, (self.dp_rank + 1) * rows)
            yield {"input": batch["tokens"][mine]}, batch["labels"][mine]

    def state_dict(self) -> dict[str, Any]:
        """The loader position (identical on every rank)."""
        return {"global_batch_loader": self.loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved position (an empty state is a fresh start)."""
        if state_dict:
            self.loader.load_state_dict(state_dict["global_batch_loader"])


def _vocab_size(job_config: TTJobConfig) -> int:
    return tt_llama3.llama3_args[job_config.model.flavor].vocab_size


def build_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: Any, job_config: TTJobConfig, **kwargs: Any
) -> BaseDataLoader:
    """The train spec's data loader: ``training.dataset`` picks it.

    * ``"synthetic_recall"``: cp_dtensor's long-range recall task (answers ~0.9 x seq_len after their cue,
      so the loss drops below chance only if attention crosses CP shards), vocabulary of the model flavor.
    * ``"text"``: the byte-tokenized ``.txt`` / ``.jsonl`` files at ``training.dataset_path``.
    * anything else: torchtitan's HuggingFace text loader (e.g. "c4", with ``model.hf_assets_path``).
    """
    training = job_config.training
    seed = job_config.debug.seed or 0
    if training.dataset == "synthetic_recall":
        dataset: Any = SyntheticRecallDataset(
            training.seq_len, _vocab_size(job_config), seed=seed, cue_repeats=max(4, training.seq_len // 64)
        )
    elif training.dataset == "text":
        if not training.dataset_path:
            raise ValueError('training.dataset = "text" needs training.dataset_path (a file or a folder).')
        dataset = TextDataset(training.dataset_path, training.seq_len)
        if dataset.vocab_size > _vocab_size(job_config):
            raise ValueError(
                f"the byte tokenizer needs {dataset.vocab_size} ids but flavor {job_config.model.flavor!r} has "
                f"vocab_size {_vocab_size(job_config)}."
            )
    else:
        from torchtitan.hf_datasets.text_datasets import build_text_dataloader

        return build_text_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs)
    return GlobalBatchDataLoader(
        dataset,
        local_batch_size=training.local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        seed=seed,
    )


def build_tokenizer(job_config: TTJobConfig) -> Any:
    """None for cp_dtensor's local datasets (they tokenize themselves), else torchtitan's HF tokenizer."""
    if job_config.training.dataset in _LOCAL_DATASETS:
        return None
    from torchtitan.components.tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(job_config)


class _JsonlLogger(tt_metrics.BaseLogger):
    """Appends ``{"step": ..., <metric>: value, ...}`` lines (full float precision) to a file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def build_metrics_processor(
    job_config: TTJobConfig, parallel_dims: TTParallelDims, model_args: Any = None, tag: str | None = None
) -> tt_metrics.MetricsProcessor:
    """torchtitan's metrics processor, plus a JSON-lines log (``cp_dtensor.log_file``).

    Written by the rank that holds the loss: rank 0, or under pipeline parallelism the first rank of the
    last stage (torchtitan's own choice of metrics rank).
    """
    processor = tt_metrics.build_metrics_processor(job_config, parallel_dims, model_args, tag)
    log_file = _cp_config(job_config).log_file
    rank = dist.get_rank() if dist.is_initialized() else 0
    if log_file and rank == tt_metrics._get_metrics_rank(parallel_dims, job_config):
        loggers = processor.logger
        if not isinstance(loggers, tt_metrics.LoggerContainer):  # a do-nothing BaseLogger: no TB/W&B here
            loggers = tt_metrics.LoggerContainer()
            loggers.add_logger(processor.logger)
            processor.logger = loggers
        loggers.add_logger(_JsonlLogger(Path(job_config.job.dump_folder) / log_file))
    return processor


# --------------------------------------------------------------------------------------------------------
# Models: seeded, degree-independent init; cp_dtensor's model interface
# --------------------------------------------------------------------------------------------------------


@dataclass
class Llama3Args(tt_llama3.TransformerModelArgs):
    """torchtitan's Llama 3 args plus the init seed, taken from ``debug.seed`` by ``update_from_config``."""

    init_seed: int | None = None
    """Seed of :meth:`SeededLlama3.init_weights`; None keeps torchtitan's own (global RNG) init."""

    def update_from_config(self, job_config: TTJobConfig, **kwargs: Any) -> None:
        """torchtitan's update (max_seq_len from training.seq_len), then ``init_seed = debug.seed``."""
        super().update_from_config(job_config, **kwargs)
        self.init_seed = job_config.debug.seed


def _llama3_args(flavor: str, **changes: Any) -> Llama3Args:
    """A fresh copy of torchtitan's flavor (its table is shared and its trainer mutates entries)."""
    base = tt_llama3.llama3_args[flavor]
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return Llama3Args(**{**values, **changes})


def _param_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"torchtitan.llama3:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def _seeded_fill_(param: torch.Tensor, key: str, seed: int, std: float, bound: float | None) -> None:
    """Draw the full tensor in fp32 from a generator seeded by (seed, key); keep this rank's shard."""
    local = param.to_local() if isinstance(param, DTensor) else param
    generator = torch.Generator(device=local.device).manual_seed(_param_seed(seed, key))
    full = torch.empty(param.shape, dtype=torch.float32, device=local.device)
    if bound is None:
        full.normal_(0.0, std, generator=generator)
    else:
        nn.init.trunc_normal_(full, 0.0, std, -bound, bound, generator=generator)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    local.copy_(full)


class SeededLlama3(tt_model.Transformer):
    """torchtitan's Llama 3 ``Transformer`` whose init does not depend on the parallel degrees.

    torchtitan draws sharded parameters through DTensor's RNG, which supports CUDA-like devices only: on
    CPU every FSDP rank draws its shard from the same generator state (shards repeat each other and differ
    from a one-process run). With a seed, :meth:`init_weights` draws each parameter whole from a generator
    seeded by (seed, parameter name), with torchtitan's distributions, and keeps the local shard: the same
    seed gives the same full weights for any degrees and devices (cp_dtensor's parity standard).
    """

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None, seed: int | None = None) -> None:
        """Initialize parameters and the RoPE buffer.

        Args:
            buffer_device: device of the RoPE buffer (torchtitan's argument).
            seed: init seed; None takes ``model_args.init_seed``, and if that is None too this is torchtitan's
                own ``init_weights`` (global RNG). Parameters must not be on the meta device.
        """
        seed = seed if seed is not None else getattr(self.model_args, "init_seed", None)
        if seed is None:
            super().init_weights(buffer_device=buffer_device)
            return
        with torch.device(buffer_device or self.freqs_cis.device):
            self.freqs_cis = self._precompute_freqs_cis()
        if self.tok_embeddings is not None:
            _seeded_fill_(self.tok_embeddings.weight, "tok_embeddings.weight", seed, 1.0, None)
        for name, layer in self.layers.items():
            block = getattr(layer, "_checkpoint_wrapped_module", layer)  # under activation checkpointing
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            # torchtitan: std 0.02 for wq/wk/wv/w1, the depth-scaled weight_init_std for wo/w2/w3, cut at +-2.
            std_out = block.weight_init_std
            for module_name, weights in (
                ("attention", ("wq", "wk", "wv", "wo")),
                ("feed_forward", ("w1", "w2", "w3")),
            ):
                module = getattr(block, module_name)
                for w in weights:
                    std = 0.02 if w in ("wq", "wk", "wv", "w1") else std_out
                    key = f"layers.{name}.{module_name}.{w}.weight"
                    _seeded_fill_(getattr(module, w).weight, key, seed, std, 2.0)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            std = self.model_args.dim**-0.5
            _seeded_fill_(self.output.weight, "output.weight", seed, std, 3 * std)


class _Attention(tt_model.Attention):
    """torchtitan's ``Attention`` called as ``attention(x, rope)``; ``sdpa`` names its SDPA module."""

    @property
    def sdpa(self) -> nn.Module:
        """The SDPA wrapper that cp_dtensor's CP hooks (torchtitan's ``inner_attention``)."""
        return self.inner_attention

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Self-attention; ``rope`` (S, head_dim / 2) complex holds the RoPE factors of x's positions."""
        return super().forward(x, rope, None)


class _Block(tt_model.TransformerBlock):
    """torchtitan's ``TransformerBlock`` called as ``block(x, rope)`` (two arguments, as cp_dtensor's)."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Pre-norm block: ``h = x + attention(norm(x))``, ``h + feed_forward(norm(h))``."""
        h = x + self.attention(self.attention_norm(x), rope)  # (B, S, dim)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, S, dim)


class TorchtitanLlama3(SeededLlama3):
    """torchtitan's Llama 3 with cp_dtensor's model interface (Note [torchtitan integration]).

    Same modules, parameter names and numerics as torchtitan's; the blocks and attentions take the RoPE
    factors of their positions instead of (freqs_cis, attention_masks, positions), so cp_dtensor's TP plan,
    CP hooks, activation checkpointing, FSDP and pipeline split apply unchanged. ``args`` is the matching
    cp_dtensor :class:`ModelArgs`.

    Args:
        model_args: torchtitan ``TransformerModelArgs`` with ``attn_type == "sdpa"``.
    """

    def __init__(self, model_args: tt_llama3.TransformerModelArgs) -> None:
        super().__init__(model_args)
        for block in self.layers.values():
            # Swap in the subclasses (they add no state) rather than re-running torchtitan's constructors;
            # FSDP2 swaps module classes the same way.
            block.__class__ = _Block
            block.attention.__class__ = _Attention
        self.args = _cp_dtensor_args(model_args)

    def forward(  # type: ignore[override]
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the model (or a pipeline stage of it).

        Args:
            tokens: token ids (B, S) int64; hidden states (B, S, dim) when ``tok_embeddings`` is None.
            positions: global positions (B, S) or (S,) of the tokens (their CP layout order); the rows of a
                batch must share their positions, as cp_dtensor's batches do. Defaults to ``arange(S)``.

        Returns:
            Logits (B, S, vocab_size), or hidden states (B, S, dim) when ``output`` is None.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, S, dim)
        if positions is None:
            rope = self.freqs_cis[: h.shape[1]]  # (S, head_dim / 2) complex64
        else:
            rope = self.freqs_cis[positions[0] if positions.dim() == 2 else positions]  # (S, head_dim / 2)
        for layer in self.layers.values():
            h = layer(h, rope)  # (B, S, dim)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def _cp_dtensor_args(a: tt_llama3.TransformerModelArgs) -> ModelArgs:
    return ModelArgs(
        dim=a.dim,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        vocab_size=a.vocab_size,
        multiple_of=a.multiple_of,
        ffn_dim_multiplier=a.ffn_dim_multiplier,
        norm_eps=a.norm_eps,
        rope_theta=float(a.rope_theta),
        max_seq_len=a.max_seq_len,
        causal=True,
    )


def _sdpa_args(flavor: str, seq_len: int, causal: bool) -> Llama3Args:
    flavors = sorted(name for name, a in tt_llama3.llama3_args.items() if a.attn_type == "sdpa")
    if flavor not in flavors:
        raise ValueError(
            f"model.flavor {flavor!r} is not a torchtitan Llama 3 flavor with SDPA attention; choose one of "
            f'{flavors} for model.name = "torchtitan.llama3".'
        )
    if not causal:
        raise ValueError(
            'model.attention_mask = "bidirectional" is not available for model.name = "torchtitan.llama3" '
            "(torchtitan's Llama 3 attention is causal)."
        )
    return _llama3_args(flavor, max_seq_len=seq_len)


def torchtitan_llama3_args(flavor: str, *, seq_len: int, causal: bool = True) -> ModelArgs:
    """cp_dtensor ``ModelArgs`` of torchtitan's Llama 3 ``flavor`` (for validation, TP and FLOPs).

    Raises:
        ValueError: unknown or non-SDPA flavor, or ``causal=False`` (torchtitan's attention is causal).
    """
    return _cp_dtensor_args(_sdpa_args(flavor, seq_len, causal))


def build_torchtitan_llama3(flavor: str, *, seq_len: int, causal: bool = True) -> TorchtitanLlama3:
    """torchtitan's Llama 3 ``flavor`` for cp_dtensor's trainer, RoPE table for ``seq_len`` positions.

    Built on the current default device (``with torch.device("meta"):`` for a shape-only model); then
    parallelize, ``to_empty`` and ``init_weights(seed=...)``.

    Raises:
        ValueError: as :func:`torchtitan_llama3_args`.
    """
    return TorchtitanLlama3(_sdpa_args(flavor, seq_len, causal))


# --------------------------------------------------------------------------------------------------------
# The train spec
# --------------------------------------------------------------------------------------------------------


def get_train_spec() -> tt_train_spec.TrainSpec:
    """torchtitan's Llama 3 train spec with cp_dtensor's parallelize, init, data, tokenizer and metrics."""
    return dataclasses.replace(
        tt_llama3.get_train_spec(),
        model_cls=SeededLlama3,
        model_args={name: _llama3_args(name) for name in tt_llama3.llama3_args},
        parallelize_fn=parallelize_llama,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_metrics_processor_fn=build_metrics_processor,
    )


def register_train_spec() -> None:
    """Register :func:`get_train_spec` as ``"cp_dtensor.llama3"`` (idempotent; runs on import)."""
    try:
        tt_train_spec.register_train_spec(TRAIN_SPEC_NAME, get_train_spec())
    except ValueError as e:
        if "already registered" not in str(e):
            raise


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def main() -> None:
    """Run torchtitan's trainer (its command line) with the ``"cp_dtensor.llama3"`` train spec available.

    Launch with torchrun, e.g. ``torchrun --nproc-per-node 2 -m cp_dtensor.integrations.torchtitan
    --job.config_file train_configs/torchtitan/llama3_debug_cp2.toml``; without torchrun it runs one process.
    Applies the CPU fixes when there is no accelerator.
    """
    if not torch.accelerator.is_available():
        configure_torchtitan_for_cpu()
    if "RANK" not in os.environ:  # plain `python -m ...`: a one-process job
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
    register_train_spec()
    from torchtitan.train import Trainer
    from torchtitan.train import main as torchtitan_main

    torchtitan_main(Trainer)


if __name__ == "__main__":
    # `python -m` runs this file as `__main__`; run the importable module instead, so that the train spec
    # and the config class torchtitan imports by name are the very objects registered here.
    from cp_dtensor.integrations.torchtitan import main as _main

    _main()
else:
    register_train_spec()
