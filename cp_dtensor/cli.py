"""Command-line entry of ``train.py``: parse and validate the config, launch the ranks, report failures."""

from __future__ import annotations

import os
import sys
import warnings

from cp_dtensor.checkpoint import CheckpointError
from cp_dtensor.config import ConfigError, JobConfig, load_config
from cp_dtensor.launch import LaunchError, in_launcher_env, run_distributed
from cp_dtensor.trainer import Trainer, validate_job

__all__ = ["local_world_size", "main"]


def local_world_size(cfg: JobConfig) -> int:
    """Ranks to spawn without a launcher: the product of the degrees (data_parallel_degree -1 counts as 1)."""
    par = cfg.parallelism
    dp = max(par.data_parallel_degree, 1)
    return dp * par.context_parallel_degree * par.tensor_parallel_degree * par.pipeline_parallel_degree


# Errors that mean bad input or a stopped run, not a bug: reported as one line, without a traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    CheckpointError,
    FloatingPointError,
)


def _train(cfg: JobConfig) -> None:
    # With TP the model's logits are DTensor.to_local() views, which FSDP2 warns about once per rank: an
    # in-place op on them would skip its pre-backward hook. The train step only reads the logits.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    Trainer(cfg).train()


def _error(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"error: {message}\n")


def _warn(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(f"warning: {message}\n")


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    """Run training; returns the process exit code (0 ok, 2 bad config, 1 a rank failed)."""
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        _error(str(e))
        return 2
    world = int(os.environ["WORLD_SIZE"]) if in_launcher_env() else local_world_size(cfg)
    try:
        validate_job(cfg, world, warn=_warn)
    except (ValueError, FileNotFoundError) as e:
        _error(str(e))
        return 2
    try:
        run_distributed(
            _train, world, cfg, timeout_s=cfg.timeouts.init_seconds, expected_errors=EXPECTED_ERRORS
        )
    except LaunchError as e:
        _error(str(e))
        return 1
    except EXPECTED_ERRORS as e:  # under torchrun: this rank's own failure
        _error(str(e))
        return 1
    return 0
