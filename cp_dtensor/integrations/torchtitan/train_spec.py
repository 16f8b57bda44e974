"""The train spec and the entry point: torchtitan's trainer, torchtitan's Llama 3, cp_dtensor's CP.

Note [Train specs served]
~~~~~~~~~~~~~~~~~~~~~~~~~
torchtitan's ``get_train_spec(name)`` looks in its registry of extra specs first, then in its own models.
:func:`get_train_spec` is torchtitan's Llama 3 spec with the parts of this package swapped in; it is
registered under two names::

    [model] name          registered by                     so that
    "cp_dtensor.llama3"   import of this package            -m torchtitan.train works too (custom_import)
    "llama3"              main() only (one log line)        a stock torchtitan Llama 3 config gets
                                                            cp_dtensor's CP through our entry point

    cp_dtensor's Trainer(job_config)     torchtitan's, one method changed for block_causal under CP (trainer)
      get_train_spec(model.name) -> _extra_train_specs[name]   (torchtitan's own llama3 spec is never used)

"llama3" is registered in :func:`main` and not at import, so that importing this package (e.g. for
cp_dtensor's own trainer, or from torchtitan's ``custom_import``) never changes what torchtitan's own
model name means in that process.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torchtitan.protocols.train_spec as tt_train_spec
from torchtitan.models import llama3 as tt_llama3
from torchtitan.tools.logging import init_logger, logger

from cp_dtensor.integrations.torchtitan.cpu_shims import configure_torchtitan_for_cpu
from cp_dtensor.integrations.torchtitan.data import build_dataloader, build_tokenizer
from cp_dtensor.integrations.torchtitan.metrics import build_metrics_processor
from cp_dtensor.integrations.torchtitan.model import SeededLlama3, llama3_args
from cp_dtensor.integrations.torchtitan.parallelize import parallelize_llama

__all__ = ["STOCK_TRAIN_SPEC_NAME", "TRAIN_SPEC_NAME", "get_train_spec", "main", "register_train_spec"]

TRAIN_SPEC_NAME = "cp_dtensor.llama3"
"""``[model] name`` of torchtitan's Llama 3 with cp_dtensor's context parallelism."""

STOCK_TRAIN_SPEC_NAME = "llama3"
"""torchtitan's own name of its Llama 3 spec; :func:`main` serves it with :func:`get_train_spec` too."""


def get_train_spec() -> tt_train_spec.TrainSpec:
    """torchtitan's Llama 3 train spec with cp_dtensor's parallelize, init, data, tokenizer and metrics."""
    return dataclasses.replace(
        tt_llama3.get_train_spec(),
        model_cls=SeededLlama3,
        model_args={name: llama3_args(name) for name in tt_llama3.llama3_args},
        parallelize_fn=parallelize_llama,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_metrics_processor_fn=build_metrics_processor,
    )


def register_train_spec(name: str = TRAIN_SPEC_NAME) -> None:
    """Register :func:`get_train_spec` in torchtitan's registry as ``name`` (idempotent).

    Args:
        name: the ``[model] name`` to serve; the package registers ``"cp_dtensor.llama3"`` on import.
    """
    try:
        tt_train_spec.register_train_spec(name, get_train_spec())
    except ValueError as e:
        if "already registered" not in str(e):
            raise


def main() -> None:
    """Run torchtitan's trainer (its command line) with cp_dtensor's train spec (Note [Train specs served]).

    The trainer is :class:`~cp_dtensor.integrations.torchtitan.trainer.Trainer`: torchtitan's, except that
    under CP a ``block_causal`` flavor's document ids reach the model whole.

    Serves ``[model] name`` ``"cp_dtensor.llama3"`` and torchtitan's own ``"llama3"``. Launch with torchrun,
    e.g. ``torchrun --nproc-per-node 2 -m cp_dtensor.integrations.torchtitan --job.config_file
    train_configs/torchtitan/llama3_debug_cp2.toml``; without torchrun it runs one process. Applies the CPU
    fixes when there is no accelerator (Note [torchtitan on CPU]).
    """
    if not torch.accelerator.is_available():
        configure_torchtitan_for_cpu()
    if "RANK" not in os.environ:  # plain `python -m ...`: a one-process job
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
    register_train_spec(TRAIN_SPEC_NAME)
    register_train_spec(STOCK_TRAIN_SPEC_NAME)
    init_logger()  # torchtitan's main sets up the same logger again
    logger.info(
        f'cp_dtensor: model.name "{STOCK_TRAIN_SPEC_NAME}" is served by cp_dtensor\'s train spec (as '
        f"\"{TRAIN_SPEC_NAME}\": torchtitan's Llama 3 with cp_dtensor's context parallelism)"
    )
    from torchtitan.train import main as torchtitan_main

    from cp_dtensor.integrations.torchtitan.trainer import Trainer

    torchtitan_main(Trainer)
