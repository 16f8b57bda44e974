"""The model a job config names (``model.name``, ``model.flavor``, the attention mask): its shape and
its module."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from cp_dtensor.config import JobConfig
from cp_dtensor.models.llama import LLAMA3_FLAVORS, ModelArgs, Transformer

__all__ = ["build_model", "model_args_for"]


def _torchtitan_integration() -> Any:
    try:
        from cp_dtensor.integrations import torchtitan
    except ImportError as e:
        raise ValueError(
            f'model.name "torchtitan.llama3" needs the torchtitan extra: pip install "cp_dtensor[torchtitan]" '
            f"(torchtitan>=0.2.2,<0.3); {e}"
        ) from None
    return torchtitan


def model_args_for(cfg: JobConfig) -> ModelArgs:
    """Shape of the model that ``cfg.model`` names (``name``, ``flavor``, ``attention_mask``).

    Raises:
        ValueError: unknown flavor; for "torchtitan.llama3" also a missing extra or a bidirectional mask.
    """
    causal = cfg.model.attention_mask != "bidirectional"
    if cfg.model.name == "torchtitan.llama3":
        if cfg.model.attention_mask == "document_causal" or cfg.model.sliding_window:
            raise ValueError(
                'model.name "torchtitan.llama3" serves "causal" attention here; for packed documents use '
                'model.name "llama3", or torchtitan\'s own block_causal mask through '
                "python -m cp_dtensor.integrations.torchtitan."
            )
        return _torchtitan_integration().torchtitan_llama3_args(
            cfg.model.flavor, seq_len=cfg.training.seq_len, causal=causal
        )
    if cfg.model.flavor not in LLAMA3_FLAVORS:
        raise ValueError(
            f"model.flavor {cfg.model.flavor!r} is unknown; choose one of {sorted(LLAMA3_FLAVORS)}."
        )
    return replace(
        LLAMA3_FLAVORS[cfg.model.flavor],
        causal=causal,
        sliding_window=cfg.model.sliding_window,
        sliding_window_layers=cfg.model.sliding_window_layers,
    )


def build_model(cfg: JobConfig) -> nn.Module:
    """The model that ``cfg.model`` names, on the current default device: cp_dtensor's Llama ("llama3") or
    torchtitan's Llama 3 behind cp_dtensor's model interface ("torchtitan.llama3")."""
    args = model_args_for(cfg)
    if cfg.model.name == "torchtitan.llama3":
        return _torchtitan_integration().build_torchtitan_llama3(
            cfg.model.flavor, seq_len=cfg.training.seq_len, causal=args.causal
        )
    return Transformer(args)
