"""HuggingFace ``config.json`` <-> :class:`~cp_dtensor.models.args.ModelArgs` (Llama 3.x and Qwen3 dense).

Note [RoPE in config.json]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Two spellings occur in practice; both are read, the transformers-5 one is written::

    Hub (Llama 3.1 8B):   "rope_theta": 500000.0,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
                          (older files say "type" instead of "rope_type"; "rope_scaling": null = default)
    transformers 5:       "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, ...}

The trained context of a scaling comes from the scaling's own ``original_max_position_embeddings``, else
from ``max_position_embeddings``; dynamic NTK always grows from ``max_position_embeddings`` (as transformers
does). Per-layer RoPE tables and partial rotary dims are refused by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.rope import ROPE_TYPES, RopeScaling

__all__ = [
    "CONFIG_FILE",
    "args_from_hf_config",
    "hf_architecture",
    "hf_config_from_args",
    "read_hf_config",
    "rope_from_hf_config",
    "rope_to_hf_parameters",
]

CONFIG_FILE = "config.json"
_DEFAULT_THETA = 10000.0  # transformers' default base for Llama and Qwen3 configs without one


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a HuggingFace model folder (or the file itself).

    Args:
        path: The folder, or its config.json.

    Returns:
        The config as a dict.

    Raises:
        FileNotFoundError: No config.json there (the message names the path).
    """
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_FILE} at {path}: a HuggingFace model folder holds config.json and *.safetensors "
            f"(for a checkpoint folder, check checkpoint.initial_load_path / model.hf_assets_path)"
        )
    with open(file) as f:
        return json.load(f)


def hf_architecture(config: Mapping[str, Any]) -> str:
    """The model class named by a config: ``architectures[0]``, else derived from ``model_type``.

    Args:
        config: A parsed config.json.

    Returns:
        E.g. ``"LlamaForCausalLM"``, or ``""`` when the config names none.
    """
    archs = config.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = str(config.get("model_type", ""))
    return {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(model_type, model_type)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_from_hf_config(config: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """RoPE base and scaling of a config, in either spelling (Note [RoPE in config.json]).

    Args:
        config: A parsed config.json.

    Returns:
        ``(theta, scaling)``.

    Raises:
        ValueError: A RoPE type we do not implement, per-layer RoPE tables, or partial rotary dims.
    """
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(
            f"config.json has per-layer RoPE parameters ({sorted(params)}); cp_dtensor's models use one RoPE "
            f"for every layer"
        )
    theta = float(params.get("rope_theta") or config.get("rope_theta") or _DEFAULT_THETA)
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"partial_rotary_factor {partial} is not supported (RoPE rotates every head dim here)"
        )
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json asks for RoPE type {rope_type!r}; cp_dtensor implements {list(ROPE_TYPES)}"
        )
    max_pos = int(config.get("max_position_embeddings") or 0)
    if rope_type == "default":
        return theta, RopeScaling()
    factor = params.get("factor")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=float(factor))
    if rope_type == "dynamic":
        return theta, RopeScaling("dynamic", factor=float(factor), original_max_position_embeddings=max_pos)
    context = int(
        params.get("original_max_position_embeddings")
        or config.get("original_max_position_embeddings")
        or max_pos
    )
    if rope_type == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=float(factor),
            original_max_position_embeddings=context,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
        )
    # yarn
    factor = float(factor) if factor else max_pos / context
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return theta, RopeScaling(
        "yarn",
        factor=factor,
        original_max_position_embeddings=context,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def rope_to_hf_parameters(theta: float, scaling: RopeScaling) -> dict[str, Any]:
    """The transformers-5 ``rope_parameters`` dict of a RoPE base and scaling.

    Args:
        theta: RoPE base.
        scaling: The scaling.

    Returns:
        ``{"rope_type": ..., "rope_theta": ..., <the type's fields>}``.
    """
    out: dict[str, Any] = {"rope_type": scaling.type, "rope_theta": float(theta)}
    if scaling.type == "default":
        return out
    out["factor"] = float(scaling.factor)
    if scaling.type == "llama3":
        out.update(
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    elif scaling.type == "yarn":
        out.update(
            original_max_position_embeddings=scaling.original_max_position_embeddings,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
            truncate=scaling.truncate,
        )
        if scaling.attention_factor is not None:
            out["attention_factor"] = scaling.attention_factor
    return out


def _refuse(config: Mapping[str, Any], key: str, ok: Any, what: str) -> None:
    value = config.get(key, ok)
    if value not in (ok, None):
        raise ValueError(f"config.json sets {key} = {value!r}; {what}")


def args_from_hf_config(config: Mapping[str, Any], *, qk_norm: bool) -> ModelArgs:
    """:class:`ModelArgs` of a Llama- or Qwen3-style config.json.

    Args:
        config: A parsed config.json.
        qk_norm: The family normalizes queries and keys per head (Qwen3).

    Returns:
        The args (``max_seq_len`` = ``max_position_embeddings``).

    Raises:
        ValueError: A feature our modules do not have (biases, another activation, sliding windows),
            naming the key.
    """
    _refuse(config, "hidden_act", "silu", "cp_dtensor's SwiGLU uses silu")
    _refuse(config, "attention_bias", False, "cp_dtensor's attention projections have no bias")
    _refuse(config, "mlp_bias", False, "cp_dtensor's feed-forward has no bias")
    _refuse(config, "use_sliding_window", False, "sliding-window Qwen3 layers are not supported")
    theta, scaling = rope_from_hf_config(config)
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    explicit_head_dim = None if head_dim in (None, dim // heads) else int(head_dim)
    return ModelArgs(
        dim=dim,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(config["vocab_size"]),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(config.get("max_position_embeddings") or 131072),
        attention_head_dim=explicit_head_dim,
        ffn_hidden_size=int(config["intermediate_size"]),
        qk_norm=qk_norm,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def hf_config_from_args(
    args: ModelArgs,
    *,
    architecture: str,
    model_type: str,
    dtype: str,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A config.json for ``args`` that transformers builds the same model from.

    Args:
        args: Our model's args.
        architecture: ``"LlamaForCausalLM"`` or ``"Qwen3ForCausalLM"``.
        model_type: ``"llama"`` or ``"qwen3"``.
        dtype: The dtype of the saved weights, e.g. ``"float32"``.
        base: The config the model was loaded from (token ids and other keys are kept from it).

    Returns:
        The config dict.
    """
    config: dict[str, Any] = {
        k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")
    }
    max_pos = args.max_seq_len
    if args.rope_scaling.type == "dynamic":  # transformers grows dynamic NTK from max_position_embeddings
        max_pos = args.rope_scaling.original_max_position_embeddings
    config.update(
        architectures=[architecture],
        model_type=model_type,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings,
        rope_parameters=rope_to_hf_parameters(args.rope_theta, args.rope_scaling),
        attention_bias=False,
        vocab_size=args.vocab_size,
        dtype=dtype,
    )
    if model_type == "llama":
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    return config
