"""HuggingFace checkpoints in and out: ``from_pretrained``, ``save_pretrained`` and their sharded forms.

Note [Loading a HuggingFace checkpoint into a sharded model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
No rank ever holds the whole model::

    build on the meta device -> parallelize (TP, CP, FSDP, PP stages: parameters become DTensor shards)
      -> to_empty (allocate the local shards only) -> init_buffers (RoPE)
      -> check_hf_checkpoint: every parameter of the whole model has a tensor of its shape (header only)
      -> load_hf_weights: per parameter, read the slice of the file that this rank's shard holds
         (Note [Reading only the local shard]), renumber q/k rows (Note [q/k permutation]), copy

Saving goes the other way: per parameter, all ranks of its mesh gather the full tensor, one writer per
pipeline stage converts it to HuggingFace's layout and queues it into files of bounded size; rank 0 writes
config.json and the index.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.hf.adapter import (
    LLAMA_ADAPTER,
    QWEN3_ADAPTER,
    HFAdapter,
    clean_param_name,
    permute_from_hf,
)
from cp_dtensor.models.hf.config import CONFIG_FILE, hf_architecture, read_hf_config
from cp_dtensor.models.hf.safetensors_io import HFCheckpointReader, HFShardWriter, write_index

__all__ = [
    "ASSET_FILES",
    "adapter_for",
    "check_hf_checkpoint",
    "from_pretrained",
    "load_hf_weights",
    "save_hf_weights",
    "save_pretrained",
    "spec_for_hf_folder",
    "write_hf_config",
]

ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""Files copied from the source folder into an exported one (so the export is a usable model folder)."""

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _unique_params(part: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) once per parameter: a tied output weight appears as the embedding only."""
    return [(clean_param_name(n), p) for n, p in part.named_parameters()]


def spec_for_hf_folder(path: str | Path) -> Any:
    """The registered family that reads the architecture of ``path``/config.json.

    Args:
        path: A HuggingFace model folder.

    Returns:
        Its :class:`~cp_dtensor.models.registry.ModelSpec`.

    Raises:
        ValueError: No registered family reads that architecture (the message names it and the supported
            ones).
    """
    from cp_dtensor.models.registry import get_model_spec, hf_architectures

    arch = hf_architecture(read_hf_config(path))
    served = hf_architectures()
    if arch not in served:
        raise ValueError(
            f"{Path(path) / CONFIG_FILE} is a {arch or 'model without architectures'}; cp_dtensor reads "
            f"{sorted(served)} (other architectures are not supported)."
        )
    return get_model_spec(served[arch])


def adapter_for(model: nn.Module) -> HFAdapter:
    """The HuggingFace adapter of a model built from cp_dtensor's modules: Qwen3 when it has q/k norms.

    Args:
        model: The model (its ``args`` are read).

    Returns:
        The adapter.
    """
    return QWEN3_ADAPTER if _args(model).qk_norm else LLAMA_ADAPTER


def _args(model: nn.Module) -> ModelArgs:
    args = getattr(model, "args", None)
    if not isinstance(args, ModelArgs):
        raise TypeError(
            f"{type(model).__name__} has no ModelArgs at .args; HuggingFace conversion serves models built from "
            f"cp_dtensor's modules (cp_dtensor.models.from_pretrained or a registered family's build)"
        )
    return args


def check_hf_checkpoint(
    shapes: Mapping[str, Sequence[int]],
    path: str | Path,
    adapter: HFAdapter,
    *,
    model_name: str = "the model",
) -> None:
    """Fail with one line at the first parameter that the checkpoint lacks or holds in another shape.

    Only headers are read. Call it on every rank with the whole model's shapes (before a pipeline split),
    so that all ranks stop alike.

    Args:
        shapes: ``{parameter name: full shape}`` of the whole model (a tied output weight left out).
        path: The HuggingFace folder.
        adapter: The family's adapter.
        model_name: How the configured model is called in the message (e.g. ``"llama3/8B"``).

    Raises:
        ValueError: Naming the first missing tensor or shape mismatch and the fix.
    """
    with HFCheckpointReader(path) as ckpt:
        for name, shape in shapes.items():
            key = adapter.hf_name(name)
            if key not in ckpt:
                raise ValueError(
                    f"the HuggingFace checkpoint at {path} has no tensor {key} (for parameter {name} of "
                    f"{model_name}); point checkpoint.initial_load_path at a {adapter.architecture} checkpoint "
                    f'of this model, or use model.flavor = "hf" with its folder as model.hf_assets_path.'
                )
            have = ckpt.shape(key)
            if tuple(have) != tuple(shape):
                raise ValueError(
                    f"{key} has shape {tuple(have)} in the HuggingFace checkpoint at {path}, {tuple(shape)} in "
                    f'{model_name} (parameter {name}); use model.flavor = "hf" with model.hf_assets_path = '
                    f"{path} so the model is built from the checkpoint's config.json."
                )


@torch.no_grad()
def load_hf_weights(parts: Sequence[nn.Module], path: str | Path, adapter: HFAdapter, args: ModelArgs) -> int:
    """Fill every parameter of ``parts`` from a HuggingFace folder, reading only local shards.

    Note [Loading a HuggingFace checkpoint into a sharded model]. Parameters may be plain tensors or
    DTensors of any placements (FSDP2, TP, both); they must be allocated (not meta).

    Args:
        parts: This rank's model parts (the whole model, or its pipeline stages).
        path: The HuggingFace folder.
        adapter: The family's adapter.
        args: The model's args (head size of the q/k permutation).

    Returns:
        Bytes read from the files by this rank.
    """
    with HFCheckpointReader(path) as ckpt:
        jobs = [
            (adapter.hf_name(name), name, param) for part in parts for name, param in _unique_params(part)
        ]
        for file in sorted({ckpt.file_of(key) for key, _, _ in jobs}):  # file by file: bounded mapped pages
            for key, name, param in jobs:
                if ckpt.file_of(key) == file:
                    _load_param(param, ckpt, key, adapter.permuted_head_dim(name, args))
            ckpt.close_file(file)
        return ckpt.bytes_read


def _load_param(param: torch.Tensor, ckpt: HFCheckpointReader, key: str, head_dim: int | None) -> None:
    """Copy this rank's part of checkpoint tensor ``key`` into ``param`` (Note [Reading only the local shard])."""
    if isinstance(param, DTensor):
        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
    else:
        local, shape, offset = param.data, tuple(param.shape), (0,) * param.dim()
    if local.numel() == 0:
        return
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    if head_dim is None:
        local.copy_(ckpt.read(key, index))
        return
    # Whole heads around the local rows, renumbered, then the local rows cut out.
    first, count = offset[0], shape[0]
    head0, head1 = first // head_dim, -(-(first + count) // head_dim)
    heads = ckpt.read(key, (slice(head0 * head_dim, head1 * head_dim), *index[1:]))  # (h * D, ...)
    start = first - head0 * head_dim
    local.copy_(permute_from_hf(heads, head_dim)[start : start + count])


def save_hf_weights(
    parts: Sequence[nn.Module],
    path: str | Path,
    adapter: HFAdapter,
    args: ModelArgs,
    *,
    writer: bool,
    file_stem: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 2**30,
) -> tuple[dict[str, str], int]:
    """Write the parameters of ``parts`` as HuggingFace tensors; every rank holding a shard must call it.

    DTensor parameters are gathered one at a time (all ranks of the parameter's mesh take part); only the
    ``writer`` keeps and writes them, in files of at most ``max_shard_bytes``.

    Args:
        parts: This rank's model parts.
        path: Output folder.
        adapter: The family's adapter.
        args: The model's args.
        writer: This rank writes the files.
        file_stem: File name prefix (unique per writer).
        dtype: Dtype of the saved tensors (None: the parameters').
        max_shard_bytes: Largest file.

    Returns:
        ``({key: file}, bytes)`` written by this rank (empty for non-writers).
    """
    out = HFShardWriter(path, file_stem=file_stem, max_shard_bytes=max_shard_bytes) if writer else None
    for part in parts:
        for name, param in _unique_params(part):
            full = param.full_tensor() if isinstance(param, DTensor) else param
            if out is not None:
                tensor = adapter.to_hf(name, full.detach(), args)
                out.add(adapter.hf_name(name), tensor.to(dtype) if dtype is not None else tensor)
            del full
    if out is None:
        return {}, 0
    return out.close(), out.total_bytes


def write_hf_config(
    path: str | Path,
    adapter: HFAdapter,
    args: ModelArgs,
    *,
    dtype: torch.dtype,
    base: Mapping[str, Any] | None = None,
    assets_from: str | Path | None = None,
) -> None:
    """Write config.json (and copy tokenizer / generation files from ``assets_from`` when present).

    Args:
        path: Output folder.
        adapter: The family's adapter.
        args: The model's args.
        dtype: Dtype of the saved weights.
        base: The config the model came from (kept keys: token ids and the like).
        assets_from: A HuggingFace folder whose :data:`ASSET_FILES` are copied.
    """
    import json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = adapter.hf_config(args, dtype=_DTYPE_NAMES.get(dtype, str(dtype)), base=base)
    with open(path / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)
    if assets_from is not None:
        for name in ASSET_FILES:
            source = Path(assets_from) / name
            if source.is_file() and source.resolve() != (path / name).resolve():
                shutil.copyfile(source, path / name)


def from_pretrained(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> nn.Module:
    """Our model with the weights of a HuggingFace folder (config.json + safetensors).

    The family comes from config.json's architecture (``LlamaForCausalLM``: Llama 3 / 3.1 / 3.2;
    ``Qwen3ForCausalLM``: Qwen3 dense); another architecture is refused by name. The model is built on the
    meta device and then filled tensor by tensor. Its logits equal transformers' up to fp32 rounding
    (Note [q/k permutation]); RoPE scaling is read from either spelling of config.json (Note [RoPE in
    config.json]).

    Args:
        path: The folder (``model.safetensors``, or shards with ``model.safetensors.index.json``).
        dtype: Parameter dtype.
        device: Where the parameters live (default CPU).

    Returns:
        The model (``model.args`` its :class:`ModelArgs`, ``model.hf_config`` the config it came from).

    Raises:
        ValueError: Unsupported architecture or feature, or a checkpoint that does not match its config.
        FileNotFoundError: No config.json or no safetensors file.
    """
    spec = spec_for_hf_folder(path)
    config = read_hf_config(path)
    args = spec.hf_adapter.args_from_config(config)
    with torch.device("meta"):
        model = spec.build(args).to(dtype)
    model.to_empty(device=device or "cpu")
    model.init_buffers()
    shapes = {name: tuple(p.shape) for name, p in _unique_params(model)}
    check_hf_checkpoint(shapes, path, spec.hf_adapter, model_name=f"{spec.name} from {CONFIG_FILE}")
    load_hf_weights([model], path, spec.hf_adapter, args)
    model.hf_config = dict(config)
    return model


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 2**30,
) -> None:
    """Write ``model`` as a HuggingFace folder that ``transformers.AutoModelForCausalLM`` loads.

    Works for a whole model on one process, and for one whose parameters are DTensors (FSDP / TP): then every
    rank calls it and rank 0 writes. (The trainer's ``checkpoint.last_save_in_hf`` also handles pipeline
    stages.)

    Args:
        model: A model built from cp_dtensor's modules (``from_pretrained``, or a registered family).
        path: Output folder (created; existing files of the same names are replaced).
        dtype: Dtype of the saved weights (None: the parameters').
        max_shard_bytes: Largest safetensors file; more become shards with an index.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    args, adapter = _args(model), adapter_for(model)
    weight_map, total = save_hf_weights(
        [model], path, adapter, args, writer=rank == 0, dtype=dtype, max_shard_bytes=max_shard_bytes
    )
    if rank == 0:
        saved_dtype = dtype or next(model.parameters()).dtype
        write_hf_config(path, adapter, args, dtype=saved_dtype, base=getattr(model, "hf_config", None))
        write_index(path, weight_map, total)
