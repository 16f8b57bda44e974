"""Registry entry of torchtitan's Llama 3 in cp_dtensor's trainer (``model.name = "torchtitan.llama3"``).

The model lives in :mod:`cp_dtensor.integrations.torchtitan` (Note [torchtitan's Llama 3 in cp_dtensor's
trainer]), which imports torchtitan; this entry imports it only when the family is used, so that
``import cp_dtensor`` works without the ``torchtitan`` extra and lists the name all the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import ModuleType

from torch import nn

from cp_dtensor.models.args import ModelArgs
from cp_dtensor.models.registry import ModelOptions, ModelSpec, register_model
from cp_dtensor.parallelize import parallelize_llama
from cp_dtensor.pipeline import split_llama_into_stages

__all__ = ["TORCHTITAN_LLAMA3_SPEC"]

NAME = "torchtitan.llama3"


def _integration() -> ModuleType:
    try:
        from cp_dtensor.integrations import torchtitan
    except ImportError as e:
        raise ValueError(
            f'model.name "{NAME}" needs the torchtitan extra: pip install "cp_dtensor[torchtitan]" '
            f"(torchtitan>=0.2.2,<0.3); {e}"
        ) from None
    return torchtitan


def _flavors() -> Mapping[str, ModelArgs]:
    return _integration().torchtitan_llama3_flavors()


def _build(args: ModelArgs) -> nn.Module:
    return _integration().build_torchtitan_llama3_from_args(args)


def _apply_options(args: ModelArgs, options: ModelOptions) -> ModelArgs:
    """Causal attention over whole rows only; the RoPE table covers ``seq_len`` (torchtitan's rule)."""
    if options.attention_mask == "document_causal" or options.sliding_window:
        raise ValueError(
            f'model.name "{NAME}" serves "causal" attention here; for packed documents use model.name "llama3", '
            "or torchtitan's own block_causal mask through python -m cp_dtensor.integrations.torchtitan."
        )
    if options.attention_mask == "bidirectional":
        raise ValueError(
            f'model.attention_mask = "bidirectional" is not available for model.name = "{NAME}" (torchtitan\'s '
            f"Llama 3 attention is causal)."
        )
    if not options.rope.is_empty():
        raise ValueError(
            f'model.rope_* settings are not available for model.name = "{NAME}" (torchtitan\'s Llama 3 applies '
            f'its own RoPE); use model.name "llama3".'
        )
    return replace(args, max_seq_len=options.seq_len or args.max_seq_len)


TORCHTITAN_LLAMA3_SPEC = register_model(
    ModelSpec(
        name=NAME,
        flavors=_flavors,
        build=_build,
        parallelize=parallelize_llama,
        pipeline_split=split_llama_into_stages,
        apply_options=_apply_options,
        flavor_note="torchtitan's Llama 3 flavors with SDPA attention; its flex / varlen flavors run in "
        "torchtitan's own trainer: python -m cp_dtensor.integrations.torchtitan",
        description='torchtitan\'s Llama 3 definition (needs pip install "cp_dtensor[torchtitan]"; flavors '
        "debugmodel, 8B, 70B, 405B)",
    )
)
