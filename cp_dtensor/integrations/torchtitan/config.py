"""The ``[cp_dtensor]`` section of a torchtitan job config (torchtitan's ``job.custom_config_module`` hook).

A job config adds the section with ``[job] custom_config_module = "cp_dtensor.integrations.torchtitan"``;
torchtitan then merges :class:`JobConfig` into its own. Without that line every setting has its default
(:func:`cp_dtensor_config`), so a stock torchtitan config runs unchanged.

No ``from __future__ import annotations`` here: torchtitan merges these dataclasses into its own JobConfig
and tyro then resolves their field types outside this module, so they must be real types, not strings.
"""

from dataclasses import dataclass, field

from torchtitan.config import JobConfig as TorchtitanJobConfig

__all__ = ["CPDTensorConfig", "JobConfig", "cp_dtensor_config"]


@dataclass
class CPDTensorConfig:
    """Settings of cp_dtensor's context parallelism under torchtitan (``[cp_dtensor]`` TOML section).

    The sequence layout is not set here: it follows torchtitan's
    ``parallelism.context_parallel_load_balancer``, which shards the inputs ("headtail" -> "zigzag",
    none -> "contiguous"). ``parallelism.context_parallel_rotate_method`` belongs to PyTorch's experimental
    CP and is not used.
    """

    comm: str = "p2p"
    """How CP ranks exchange attention inputs: "p2p" ring passes overlapped with compute, one "allgather",
    "alltoall" (Ulysses), "hybrid" (all-to-all inside groups of a2a_size ranks, ring across them) or "auto"
    (the cost model's choice per call shape; see cp_dtensor.choose_comm)."""

    a2a_size: int = 0
    """Ranks per all-to-all group of comm "hybrid" (a proper divisor of the CP degree); 0 with other comms."""

    backend: str = ""
    """Attention kernel adapter of the ring op; "" chooses from the device and dtype."""

    log_file: str = "train_log.jsonl"
    """The metrics rank appends one JSON line per logged step here (relative to job.dump_folder); "" = off."""


@dataclass
class JobConfig:
    """torchtitan JobConfig extension: ``[job] custom_config_module = "cp_dtensor.integrations.torchtitan"``."""

    cp_dtensor: CPDTensorConfig = field(default_factory=CPDTensorConfig)
    """[cp_dtensor] section."""


def cp_dtensor_config(job_config: TorchtitanJobConfig) -> CPDTensorConfig:
    """The job's [cp_dtensor] section, or its defaults when the job config was not extended."""
    config = getattr(job_config, "cp_dtensor", None)
    return config if config is not None else CPDTensorConfig()
