"""The job config schema: :class:`JobConfig` (one attribute per TOML section, the section dataclasses of
:mod:`cp_dtensor.config.sections`), its validation, and applying a ``{section: {key: value}}`` mapping."""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from cp_dtensor.attention.strategy import get_strategy
from cp_dtensor.config.fields import (
    ConfigError,
    _check_type,
    _field_types,
    _Range,
    _unknown_key_error,
    _unknown_section_error,
)
from cp_dtensor.config.sections import (
    ActivationCheckpoint,
    Checkpoint,
    Compile,
    Data,
    Job,
    Metrics,
    Model,
    Parallelism,
    Timeouts,
    Training,
    Validation,
)
from cp_dtensor.parallel_dims import seq_len_problem

__all__ = [
    "ActivationCheckpoint",
    "Checkpoint",
    "Compile",
    "Data",
    "Job",
    "JobConfig",
    "Metrics",
    "Model",
    "Parallelism",
    "Timeouts",
    "Training",
    "Validation",
]


# --------------------------------------------------------------------------------------------------------
# The job config
# --------------------------------------------------------------------------------------------------------


@dataclass
class JobConfig:
    """The whole job config: one instance per TOML section; attribute names are the section names."""

    job: Job = field(default_factory=Job)
    """[job] section."""

    model: Model = field(default_factory=Model)
    """[model] section."""

    training: Training = field(default_factory=Training)
    """[training] section."""

    parallelism: Parallelism = field(default_factory=Parallelism)
    """[parallelism] section."""

    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    """[activation_checkpoint] section."""

    compile: Compile = field(default_factory=Compile)
    """[compile] section."""

    data: Data = field(default_factory=Data)
    """[data] section."""

    validation: Validation = field(default_factory=Validation)
    """[validation] section."""

    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    """[checkpoint] section."""

    metrics: Metrics = field(default_factory=Metrics)
    """[metrics] section."""

    timeouts: Timeouts = field(default_factory=Timeouts)
    """[timeouts] section."""

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as ``{section: {key: value}}`` (a deep copy)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build a validated config from ``{section: {key: value}}`` over the defaults (e.g. parsed TOML).

        Args:
            data: Sections to override; missing sections and keys keep their defaults.

        Returns:
            The validated config.

        Raises:
            ConfigError: On an unknown section or key, a wrong type, or a failed validation.
        """
        config = cls()
        _apply_mapping(config, data, source="the config dict")
        config.validate()
        return config

    @property
    def cp_layout(self) -> str:
        """The CP layout this job uses: ``parallelism.context_parallel_layout`` with "auto" resolved
        ("balanced" for document_causal, else "zigzag")."""
        layout = self.parallelism.context_parallel_layout
        if layout != "auto":
            return layout
        return "balanced" if self.model.attention_mask == "document_causal" else "zigzag"

    def validate(self) -> None:
        """Check types, ranges and the combinations that need no world size.

        Raises:
            ConfigError: For the first problem found; the message names the key and the fix.
        """
        for name, section_type in _section_types().items():
            section = getattr(self, name)
            if type(section) is not section_type:
                raise ConfigError(
                    f"{name}: expected a {section_type.__name__} section, got {type(section).__name__}; "
                    f"set JobConfig.{name} = {section_type.__name__}(...)"
                )
            hints = _field_types(section_type)
            for f in dataclasses.fields(section):
                key = f"{name}.{f.name}"
                value = _check_type(key, getattr(section, f.name), hints[f.name])
                bounds: _Range | None = f.metadata.get("range")
                if bounds is not None and not bounds.contains(value):
                    raise ConfigError(f"{key}: must be {bounds.describe()}, got {value!r}")
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        """Cross-field checks; ranges and types are already valid."""
        training, parallel = self.training, self.parallelism

        model = self.model
        if model.sliding_window_layers != "all" and not model.sliding_window:
            raise ConfigError(
                f'model.sliding_window_layers = "{model.sliding_window_layers}" needs a window, but '
                f"model.sliding_window = 0 (off); set model.sliding_window to the window in tokens, or remove "
                f"sliding_window_layers"
            )

        option = self.activation_checkpoint.selective_ac_option
        if not (option.isascii() and option.isdigit() and int(option) >= 1):
            raise ConfigError(
                f"activation_checkpoint.selective_ac_option: expected a positive integer string (checkpoint "
                f'every N-th block), got {option!r}; e.g. selective_ac_option = "2"'
            )

        if training.global_batch_size != -1:
            unit = training.local_batch_size
            unit_text = f"training.local_batch_size={unit}"
            if parallel.data_parallel_degree != -1:
                unit *= parallel.data_parallel_degree
                unit_text += f" x parallelism.data_parallel_degree={parallel.data_parallel_degree}"
            if training.global_batch_size % unit:
                raise ConfigError(
                    f"training.global_batch_size={training.global_batch_size} must be a multiple of "
                    f"{unit} ({unit_text}); {_suggest_multiples(training.global_batch_size, unit)}, or -1"
                )

        problem = seq_len_problem(
            training.seq_len,
            cp=parallel.context_parallel_degree,
            tp=parallel.tensor_parallel_degree,
            layout=self.cp_layout,
            name="training.seq_len",
        )
        if problem is not None:
            raise ConfigError(problem)

        a2a, cp, comm = (
            parallel.context_parallel_a2a_size,
            parallel.context_parallel_degree,
            parallel.context_parallel_comm,
        )
        if comm != "auto":
            try:
                get_strategy(comm)
            except ValueError as e:
                raise ConfigError(f"parallelism.context_parallel_comm: {e}") from None
        if a2a and comm != "hybrid":
            raise ConfigError(
                f'parallelism.context_parallel_a2a_size={a2a} applies only to context_parallel_comm = "hybrid" '
                f'(got "{comm}"); set it to 0 or use comm "hybrid"'
            )
        if a2a and (a2a < 2 or a2a >= cp or cp % a2a):
            divisors = [k for k in range(2, cp) if cp % k == 0]
            raise ConfigError(
                f"parallelism.context_parallel_a2a_size={a2a} must divide context_parallel_degree={cp} with "
                f"1 < k < {cp} ({'use one of ' + str(divisors) if divisors else 'none exists: use comm p2p or alltoall'}"
                f'; k = {cp} is comm "alltoall"), or 0 to let the cost model pick'
            )

        if parallel.pipeline_parallel_degree > 1:
            microbatches = parallel.pipeline_parallel_microbatches
            if microbatches == -1:
                microbatches = parallel.pipeline_parallel_degree
            if training.local_batch_size % microbatches:
                raise ConfigError(
                    f"training.local_batch_size={training.local_batch_size} must be a multiple of the "
                    f"{microbatches} pipeline microbatches (parallelism.pipeline_parallel_microbatches, -1 = "
                    f"pipeline_parallel_degree); "
                    f"{_suggest_multiples(training.local_batch_size, microbatches)} or change the microbatches"
                )

        self._validate_validation()

        if self.data.dataset in ("text", "hf", "sft") and not self.data.paths:
            example = "corpus.parquet" if self.data.dataset == "hf" else "corpus.jsonl"
            raise ConfigError(
                f'data.paths: dataset "{self.data.dataset}" needs at least one file; set data.paths = '
                f'["{example}"] in TOML or --data.paths a,b on the command line'
            )
        self._validate_model_choice()

    def _validate_validation(self) -> None:
        """The [validation] section against training and the parallel degrees."""
        val, training, parallel = self.validation, self.training, self.parallelism
        if not val.enable:
            return
        if not val.paths:
            raise ConfigError(
                'validation.paths: validation.enable needs held-out files; set validation.paths = ["val.jsonl"] '
                "in TOML or --validation.paths a.txt,b.jsonl"
            )
        seq_len = val.seq_len if val.seq_len != -1 else training.seq_len
        problem = seq_len_problem(
            seq_len,
            cp=parallel.context_parallel_degree,
            tp=parallel.tensor_parallel_degree,
            layout=self.cp_layout,
            name="validation.seq_len",
        )
        if problem is not None:
            raise ConfigError(problem)
        rows = val.local_batch_size if val.local_batch_size != -1 else training.local_batch_size
        if parallel.pipeline_parallel_degree > 1 and (seq_len, rows) != (
            training.seq_len,
            training.local_batch_size,
        ):
            raise ConfigError(
                f"validation.seq_len={seq_len} and validation.local_batch_size={rows} must equal training's "
                f"({training.seq_len}, {training.local_batch_size}) under pipeline parallelism (its stages keep "
                f"the shapes of the training microbatches); set them to -1"
            )

    def _validate_model_choice(self) -> None:
        """model.name in the registry; what flavor "hf" and the HuggingFace checkpoint options need."""
        from cp_dtensor.models.registry import HF_FLAVOR, model_names

        model, ckpt = self.model, self.checkpoint
        if model.name not in model_names():
            names = ", ".join(f'"{n}"' for n in model_names())
            raise ConfigError(
                f"model.name: {model.name!r} is not one of the registered model families {names}; pick one, or "
                f"register a family with cp_dtensor.models.register_model before the config is read"
            )
        if model.flavor == HF_FLAVOR and not model.hf_assets_path:
            raise ConfigError(
                'model.flavor "hf" builds the model from model.hf_assets_path/config.json; set model.hf_assets_path '
                "to a HuggingFace model folder"
            )
        if ckpt.initial_load_in_hf and not (ckpt.initial_load_path or model.hf_assets_path):
            raise ConfigError(
                "checkpoint.initial_load_in_hf needs a HuggingFace folder: set checkpoint.initial_load_path (or "
                "model.hf_assets_path)"
            )
        if ckpt.last_save_in_hf and not ckpt.enable:
            raise ConfigError(
                "checkpoint.last_save_in_hf writes the last checkpoint as a HuggingFace folder; set "
                "checkpoint.enable = true"
            )


def _section_types() -> Mapping[str, type]:
    """``{section name: section dataclass}`` in declaration order."""
    return _field_types(JobConfig)


def _suggest_multiples(value: int, unit: int) -> str:
    """``"use 96 or 104"``: the nearest multiples of ``unit`` around ``value`` (positive ones only)."""
    lower = value // unit * unit
    return f"use {lower} or {lower + unit}" if lower > 0 else f"use {lower + unit}"


# --------------------------------------------------------------------------------------------------------
# Unknown names
# --------------------------------------------------------------------------------------------------------


def _apply_mapping(config: JobConfig, data: Mapping[str, Any], source: str) -> None:
    """Type-check ``{section: {key: value}}`` and set it on ``config`` (no range checks yet)."""
    sections = _section_types()
    for name, table in data.items():
        if name not in sections:
            raise _unknown_section_error(sections, name, prefix="", where=f"in {source}")
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"{name}: expected a table in {source}, got {table!r}; write a [{name}] header "
                f"followed by key = value lines"
            )
        section = getattr(config, name)
        hints = _field_types(sections[name])
        for key, value in table.items():
            if key not in hints:
                raise _unknown_key_error(sections, name, key, prefix="", where=f"in {source}")
            setattr(section, key, _check_type(f"{name}.{key}", value, hints[key]))
