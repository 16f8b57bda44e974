"""Job validation: every check that needs the world size and the model shape, run before any collective
(in the launching process and again on every rank)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cp_dtensor.attention.choice import hardware_for_device
from cp_dtensor.attention.strategy import get_strategy
from cp_dtensor.config import JobConfig
from cp_dtensor.models.hf.adapter import clean_param_name
from cp_dtensor.models.hf.pretrained import check_hf_checkpoint
from cp_dtensor.models.registry import ModelSpec, hf_architectures
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.pipeline import stages_per_rank
from cp_dtensor.trainer.memory_estimate import MemoryBudget, _check_memory, local_memory_budget
from cp_dtensor.trainer.model_factory import build_model, model_args_for, model_spec_for

__all__ = ["attention_mask_settings", "initial_hf_path", "mask_change", "validate_job"]


def validate_job(
    cfg: JobConfig,
    world_size: int,
    *,
    memory: MemoryBudget | None = None,
    warn: Callable[[str], None] | None = None,
) -> ParallelDims:
    """All checks that need the world size and the model shape, before any collective.

    Args:
        cfg: the job config.
        world_size: number of ranks the job runs on.
        memory: memory one rank may fill; None measures this machine (:func:`local_memory_budget`).
        warn: receives a one-line warning when the activation estimate takes more than
            ``ACTIVATION_WARN_FRACTION`` of ``memory`` (None: no warning).

    Raises:
        ValueError: naming the value and the fix (degrees vs world size, seq_len multiple, seq_len above the
            flavor's max_seq_len, heads vs tp, pp vs layers, batch vs dp and microbatches, unknown flavor,
            activations of one step larger than a rank's memory).
    """
    par = cfg.parallelism
    pd = ParallelDims(
        dp=par.data_parallel_degree,
        pp=par.pipeline_parallel_degree,
        cp=par.context_parallel_degree,
        tp=par.tensor_parallel_degree,
        world_size=world_size,
        cp_layout=cfg.cp_layout,
    )
    pd.validate_seq_len(cfg.training.seq_len)
    spec = model_spec_for(cfg)
    args = model_args_for(cfg)
    if cfg.training.seq_len > args.max_seq_len:
        raise ValueError(
            f"training.seq_len {cfg.training.seq_len} exceeds max_seq_len {args.max_seq_len} of model flavor "
            f"{cfg.model.flavor!r}; use --training.seq_len {args.max_seq_len} or less, or extend "
            f"the context with a RoPE scaling (model.rope_type, model.rope_factor: the limit becomes the trained "
            f"context x factor)."
        )
    if pd.pp_enabled and spec.pipeline_split is None:
        raise ValueError(
            f"model.name {spec.name!r} has no pipeline split; set parallelism.pipeline_parallel_degree = 1."
        )
    if pd.pp_enabled and args.tie_embeddings:
        raise ValueError(
            f"model {cfg.model.name}/{cfg.model.flavor} ties its output projection to its token embedding, which "
            f"pipeline stages would split apart; set parallelism.pipeline_parallel_degree = 1 (use dp, cp or tp)."
        )
    _check_initial_load(cfg, spec)
    kv_heads = args.n_kv_heads or args.n_heads
    if args.n_heads % kv_heads:
        raise ValueError(
            f"model flavor {cfg.model.flavor!r}: n_heads {args.n_heads} is not a multiple of n_kv_heads {kv_heads}."
        )
    if args.n_heads % pd.tp or kv_heads % pd.tp:
        raise ValueError(
            f"parallelism.tensor_parallel_degree {pd.tp} must divide n_heads {args.n_heads} and n_kv_heads "
            f"{kv_heads} of flavor {cfg.model.flavor!r}."
        )
    comm, a2a = par.context_parallel_comm, par.context_parallel_a2a_size
    if pd.cp_enabled and comm != "auto":  # the strategy's own rule, the one the op raises with
        strategy = get_strategy(comm)
        if not (strategy.takes_group_size and not a2a):  # hybrid without a size: the cost model picks one
            problem = strategy.check(args.n_heads // pd.tp, kv_heads // pd.tp, pd.cp, a2a or None)
            if problem:
                raise ValueError(
                    f"parallelism.context_parallel_comm {comm!r}: flavor {cfg.model.flavor!r} (n_heads "
                    f"{args.n_heads}, n_kv_heads {kv_heads}, tp {pd.tp}): {problem}"
                )
    if par.context_parallel_cost_hardware != "auto":  # checked for every comm: a typo must not pass silently
        try:
            hardware_for_device("cpu", par.context_parallel_cost_hardware)
        except ValueError as e:
            raise ValueError(f"parallelism.context_parallel_cost_hardware: {e}") from None
    stages = pd.pp * stages_per_rank(par.pipeline_parallel_schedule)
    if stages > args.n_layers:
        raise ValueError(
            f"parallelism.pipeline_parallel_degree {pd.pp} needs {stages} stages but flavor "
            f"{cfg.model.flavor!r} has only {args.n_layers} layers."
        )
    if cfg.compile.enable and pd.tp_enabled:
        raise ValueError(
            "compile.enable with tensor_parallel_degree > 1 is not supported yet: with this torch, compiled "
            "TP blocks lose the gradient of their plain-tensor input (tp 2 x cp 2: the token embedding gets a "
            "zero gradient) or fail in backward (tp 2, cp 1: DTensor's Redistribute.backward receives a plain "
            "tensor), so the trainer refuses rather than train wrongly; set compile.enable = false or "
            "tensor_parallel_degree = 1."
        )
    if cfg.compile.enable and cfg.compile.backend == "inductor" and not _has_cxx_compiler():
        raise ValueError(
            "compile.enable with the inductor backend needs a C++ compiler on CPU and none was found (g++, "
            'or $CXX); install one (e.g. apt-get install g++), or set compile.backend = "aot_eager" or '
            "compile.enable = false."
        )
    backend = par.context_parallel_backend
    if pd.cp_enabled and backend in ("flash", "cudnn", "efficient") and not torch.cuda.is_available():
        raise ValueError(
            f'parallelism.context_parallel_backend "{backend}" needs a CUDA GPU and none is visible; use "auto" '
            f'or "cpu_flash".'
        )
    if pd.cp_enabled and backend == "cpu_flash" and torch.cuda.is_available():
        raise ValueError(
            'parallelism.context_parallel_backend "cpu_flash" runs on CPU tensors but training runs on the GPU; '
            'use "auto", "flash", "cudnn" or "efficient".'
        )
    val_seq_len = cfg.validation.seq_len if cfg.validation.seq_len != -1 else cfg.training.seq_len
    if cfg.validation.enable and val_seq_len > args.max_seq_len:
        raise ValueError(
            f"validation.seq_len {val_seq_len} exceeds max_seq_len {args.max_seq_len} of model flavor "
            f"{cfg.model.flavor!r}; use --validation.seq_len {args.max_seq_len} or less."
        )
    corpora = {
        "data.paths": cfg.data.paths if cfg.data.dataset in ("text", "hf", "sft") else [],
        "validation.paths": cfg.validation.paths if cfg.validation.enable else [],
    }
    for key, paths in corpora.items():
        for path in map(Path, paths):
            if not path.exists():
                raise FileNotFoundError(f"{key}: {path} does not exist.")
            if path.is_file() and path.stat().st_size == 0:
                raise ValueError(f"{key}: {path} is empty.")
    gbs = _global_batch_size(cfg, pd)
    local_rows = gbs // pd.dp
    if gbs % pd.dp or local_rows % cfg.training.local_batch_size:
        raise ValueError(
            f"training.global_batch_size {gbs} must be a multiple of data_parallel_degree {pd.dp} x "
            f"local_batch_size {cfg.training.local_batch_size}."
        )
    _check_memory(cfg, pd, args, memory or local_memory_budget(world_size), warn)
    return pd


def initial_hf_path(cfg: JobConfig) -> str | None:
    """The HuggingFace folder the job starts from, or None when ``checkpoint.initial_load_in_hf`` is off.

    Args:
        cfg: The job config.

    Returns:
        ``checkpoint.initial_load_path``, else ``model.hf_assets_path``; None without an HF initial load.
    """
    ckpt = cfg.checkpoint
    if not ckpt.initial_load_in_hf:
        return None
    return ckpt.initial_load_path or cfg.model.hf_assets_path


def _check_initial_load(cfg: JobConfig, spec: ModelSpec) -> None:
    """The initial weights exist and fit the configured model (headers only; one line at the first problem)."""
    ckpt = cfg.checkpoint
    if ckpt.last_save_in_hf and spec.hf_adapter is None:
        raise ValueError(
            f"checkpoint.last_save_in_hf: model.name {spec.name!r} has no HuggingFace checkpoint adapter; set "
            f"it to false, or use a family that writes HF checkpoints ({sorted(hf_architectures().values())})."
        )
    path = initial_hf_path(cfg)
    if path is None:
        if ckpt.initial_load_path and not Path(ckpt.initial_load_path).is_dir():
            raise FileNotFoundError(
                f"checkpoint.initial_load_path: {ckpt.initial_load_path} is not a folder (a cp_dtensor checkpoint "
                f"step folder; for a HuggingFace folder also set checkpoint.initial_load_in_hf = true)."
            )
        return
    if spec.hf_adapter is None:
        raise ValueError(
            f"checkpoint.initial_load_in_hf: model.name {spec.name!r} has no HuggingFace checkpoint adapter; use "
            f"one of the families that read HF checkpoints ({sorted(hf_architectures().values())})."
        )
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint.initial_load_path: HuggingFace folder {path} does not exist.")
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {clean_param_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    check_hf_checkpoint(shapes, path, spec.hf_adapter, model_name=f"{cfg.model.name}/{cfg.model.flavor}")


def _has_cxx_compiler() -> bool:
    """Inductor generates C++ for CPU: a compiler must be on PATH (or named by $CXX). GPUs do not need one."""
    import shutil

    if torch.cuda.is_available():
        return True
    cxx = os.environ.get("CXX")
    return bool(
        (cxx and shutil.which(cxx)) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    )


def _global_batch_size(cfg: JobConfig, pd: ParallelDims) -> int:
    gbs = cfg.training.global_batch_size
    return cfg.training.local_batch_size * pd.dp if gbs == -1 else gbs


def attention_mask_settings(cfg: JobConfig) -> dict[str, Any]:
    """The settings that decide which keys a query sees, as a checkpoint records them."""
    model = cfg.model
    return {
        "model.attention_mask": model.attention_mask,
        "model.sliding_window": model.sliding_window,
        "model.sliding_window_layers": model.sliding_window_layers,
    }


def mask_change(
    saved: dict[str, Any] | None, now: dict[str, Any], checkpoint: str, *, allowed: bool
) -> str | None:
    """One line naming each mask setting that differs between a checkpoint and this job, or None.

    Args:
        saved: :func:`attention_mask_settings` recorded with the checkpoint (None: not recorded, no check).
        now: This job's settings.
        checkpoint: The checkpoint's folder, for the message.
        allowed: ``checkpoint.allow_mask_change``: the line is a warning, not a refusal with its fix.
    """
    if not saved:
        return None
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if not changed:
        return None
    what = ", ".join(f"{k} {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in changed)
    line = f"checkpoint {checkpoint} was trained with another attention mask: {what}"
    if allowed:
        return f"{line}; continuing under the new mask (checkpoint.allow_mask_change = true)"
    back = " ".join(f"--{k} {saved[k]}" for k in changed)
    return f"{line}; resume with {back}, or set checkpoint.allow_mask_change = true to continue under the new mask"
