"""The train spec's metrics processor: torchtitan's, plus one JSON line per logged step.

::

    torchtitan MetricsProcessor.log(step, ...)
      processor.logger = LoggerContainer
        torchtitan's loggers (TensorBoard / W&B, if enabled)
        _JsonlLogger -> <job.dump_folder>/<cp_dtensor.log_file>   {"step": 3, "loss_metrics/...": ..., ...}

Values are written at full float precision, so loss curves of two runs can be compared step by step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torchtitan.components.metrics as tt_metrics
from torchtitan.config import JobConfig as TorchtitanJobConfig
from torchtitan.distributed import ParallelDims as TorchtitanParallelDims

from cp_dtensor.integrations.torchtitan.config import cp_dtensor_config

__all__ = ["build_metrics_processor"]


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
    job_config: TorchtitanJobConfig,
    parallel_dims: TorchtitanParallelDims,
    model_args: Any = None,
    tag: str | None = None,
) -> tt_metrics.MetricsProcessor:
    """torchtitan's metrics processor, plus a JSON-lines log (``cp_dtensor.log_file``).

    Written by the rank that holds the loss: rank 0, or under pipeline parallelism the first rank of the
    last stage (torchtitan's own choice of metrics rank).
    """
    processor = tt_metrics.build_metrics_processor(job_config, parallel_dims, model_args, tag)
    log_file = cp_dtensor_config(job_config).log_file
    rank = dist.get_rank() if dist.is_initialized() else 0
    if log_file and rank == tt_metrics._get_metrics_rank(parallel_dims, job_config):
        loggers = processor.logger
        if not isinstance(loggers, tt_metrics.LoggerContainer):  # a do-nothing BaseLogger: no TB/W&B here
            loggers = tt_metrics.LoggerContainer()
            loggers.add_logger(processor.logger)
            processor.logger = loggers
        loggers.add_logger(_JsonlLogger(Path(job_config.job.dump_folder) / log_file))
    return processor
