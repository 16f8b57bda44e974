"""Job configuration: TOML sections as dataclasses, command-line overrides, validation.

Modules: :mod:`~cp_dtensor.config.sections` (the section dataclasses), :mod:`~cp_dtensor.config.schema`
(:class:`JobConfig` and its validation),
:mod:`~cp_dtensor.config.parsing` (TOML and command-line overrides, :func:`load_config`, :func:`dump_toml`),
:mod:`~cp_dtensor.config.docs` (``--help`` and the markdown reference from the field docstrings) and
:mod:`~cp_dtensor.config.fields` (field ranges, type checks and value conversions they share).

A job is one TOML file with one table per section (``[job]``, ``[model]``, ``[training]``, ...). Each
section is a dataclass in :mod:`~cp_dtensor.config.sections`; every field carries an attribute docstring
(the string literal right after it), which ``--help`` prints. The same keys can be overridden from the command line as
``--section.key VALUE`` or ``--section.key=VALUE``.

Note [Config precedence]
~~~~~~~~~~~~~~~~~~~~~~~~
Later sources win; every value is type-checked where it enters, and the whole config is validated once
at the end (ranges, then combinations such as ``seq_len`` vs. the parallel degrees)::

    dataclass defaults          JobConfig()
          |  overridden by
    TOML file                   --config train_configs/debug_cpu.toml
          |  overridden by
    command line                --training.steps 10 --checkpoint.enable --data.paths a.txt,b.jsonl
          v
    JobConfig.validate()  ->  JobConfig   (or ConfigError naming the key and the fix)

Example:
    >>> cfg = load_config(["--training.steps", "10", "--parallelism.context_parallel_degree=2"])
    >>> cfg.training.steps, cfg.parallelism.context_parallel_degree
    (10, 2)
"""

from cp_dtensor.config.docs import field_docs, format_help, format_markdown_reference
from cp_dtensor.config.fields import ConfigError
from cp_dtensor.config.parsing import dump_toml, load_config
from cp_dtensor.config.schema import (
    ActivationCheckpoint,
    Checkpoint,
    Compile,
    Data,
    Job,
    JobConfig,
    Metrics,
    Model,
    Parallelism,
    Timeouts,
    Training,
    Validation,
)

__all__ = [
    "ActivationCheckpoint",
    "Checkpoint",
    "Compile",
    "ConfigError",
    "Data",
    "Job",
    "JobConfig",
    "Metrics",
    "Model",
    "Parallelism",
    "Timeouts",
    "Training",
    "Validation",
    "dump_toml",
    "field_docs",
    "format_help",
    "format_markdown_reference",
    "load_config",
]
