"""The model a job config names: its family in the model registry, its args and its module.

Every family-specific decision is the family's :class:`~cp_dtensor.models.registry.ModelSpec` (Note [Model
registry]); this module only turns the ``[model]`` section into the spec's inputs.
"""

from __future__ import annotations

from torch import nn

from cp_dtensor.config import JobConfig
from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.registry import ModelOptions, ModelSpec, get_model_spec
from cp_dtensor.models.rope import RopeOverrides

__all__ = ["build_model", "model_args_for", "model_options", "model_spec_for"]


def model_spec_for(cfg: JobConfig) -> ModelSpec:
    """The registered family ``model.name`` names.

    Args:
        cfg: The job config.

    Returns:
        Its spec.

    Raises:
        ValueError: An unregistered name (the message lists the registered ones).
    """
    return get_model_spec(cfg.model.name)


def model_options(cfg: JobConfig) -> ModelOptions:
    """The job's settings a family applies to its flavor (mask, window, seq_len, HF folder, RoPE overrides).

    Args:
        cfg: The job config.

    Returns:
        The options.
    """
    m = cfg.model
    return ModelOptions(
        attention_mask=m.attention_mask,
        sliding_window=m.sliding_window,
        sliding_window_layers=m.sliding_window_layers,
        seq_len=cfg.training.seq_len,
        hf_assets_path=m.hf_assets_path,
        rope=RopeOverrides(
            theta=m.rope_theta,
            type=m.rope_type,
            factor=m.rope_factor,
            original_max_position_embeddings=m.rope_original_max_position_embeddings,
            low_freq_factor=m.rope_low_freq_factor,
            high_freq_factor=m.rope_high_freq_factor,
            beta_fast=m.rope_beta_fast,
            beta_slow=m.rope_beta_slow,
            attention_factor=m.rope_attention_factor,
        ),
    )


def model_args_for(cfg: JobConfig) -> ModelArgs:
    """Shape of the model that ``cfg.model`` names (family, flavor or config.json, job options).

    Args:
        cfg: The job config.

    Returns:
        The model args.

    Raises:
        ValueError: Unknown name or flavor, or an option the family refuses (the message names it).
    """
    return model_spec_for(cfg).model_args(cfg.model.flavor, model_options(cfg))


def build_model(cfg: JobConfig) -> nn.Module:
    """The model that ``cfg.model`` names, built by its family on the current default device.

    Args:
        cfg: The job config.

    Returns:
        The plain model (use ``with torch.device("meta"):`` for a shape-only one).
    """
    return model_spec_for(cfg).build(model_args_for(cfg))
