"""Job configuration: TOML sections as dataclasses, command-line overrides, validation.

A job is one TOML file with one table per section (``[job]``, ``[model]``, ``[training]``, ...). Each
section is a dataclass below; every field carries an attribute docstring (the string literal right after
it), which ``--help`` prints. The same keys can be overridden from the command line as
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

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from cp_dtensor.parallel_dims import seq_len_problem

try:
    import tomli
except ModuleNotFoundError:  # the same parser ships with Python >= 3.11 as tomllib
    import tomllib as tomli

__all__ = [
    "ActivationCheckpoint",
    "Checkpoint",
    "Comm",
    "ConfigError",
    "Data",
    "Job",
    "JobConfig",
    "Metrics",
    "Model",
    "Parallelism",
    "Training",
    "dump_toml",
    "field_docs",
    "format_help",
    "format_markdown_reference",
    "load_config",
]

_T = TypeVar("_T")

_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})
_HELP_FLAGS = frozenset({"-h", "--help"})


class ConfigError(ValueError):
    """An invalid config key, value or combination; the one-line message names the key and the fix."""


# --------------------------------------------------------------------------------------------------------
# Field ranges
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    """Allowed numeric range of a field; ``sentinel`` is one extra allowed value (e.g. -1 = "inferred")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    sentinel: int | None = None

    def contains(self, value: float) -> bool:
        """Whether ``value`` is allowed."""
        if self.sentinel is not None and value == self.sentinel:
            return True
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        """Human-readable range, e.g. ``">= 1 or -1"`` or ``">= 0 and <= 1"``."""
        bounds = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        text = " and ".join(bounds)
        return f"{text} or {self.sentinel}" if self.sentinel is not None else text


def _bounded(
    default: _T,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    sentinel: int | None = None,
) -> _T:
    """A dataclass field with a default and an allowed range, checked by :meth:`JobConfig.validate`."""
    return field(default=default, metadata={"range": _Range(ge=ge, gt=gt, le=le, lt=lt, sentinel=sentinel)})


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Where the run writes its outputs and what it is."""

    dump_folder: str = "./outputs"
    """Root folder for logs, checkpoints and TensorBoard files; relative paths of other sections are under it."""

    description: str = ""
    """Free-text description of the run, recorded with its outputs."""


@dataclass
class Model:
    """Which model to train."""

    name: Literal["llama3", "torchtitan.llama3"] = "llama3"
    """Model family: "llama3" (cp_dtensor's) or "torchtitan.llama3" (torchtitan's Llama 3 definition; needs pip install "cp_dtensor[torchtitan]"; flavors debugmodel, 8B, 70B, 405B)."""

    flavor: str = "debug"
    """Size preset of the model family (e.g. "debug", "8B"); see cp_dtensor.models for the list."""

    attention_mask: Literal["causal", "bidirectional", "document_causal"] = "causal"
    """Attention mask: "causal" (decoder, each token sees itself and earlier tokens), "bidirectional", or "document_causal" (causal within each packed document: a token sees only earlier tokens of its own document)."""

    sliding_window: int = _bounded(0, ge=0)
    """Sliding-window attention of the local layers, in tokens (a query sees that many keys up to itself); 0 = off."""

    sliding_window_layers: Literal["all", "alternate"] = "all"
    """With sliding_window: which layers are local, "all" or "alternate" (even layers local, odd layers global)."""


@dataclass
class Training:
    """Batch shape, optimizer, learning-rate schedule and training-loop settings."""

    seq_len: int = _bounded(2048, ge=1)
    """Tokens per sequence (the global sequence, before context-parallel sharding)."""

    global_batch_size: int = _bounded(-1, ge=1, sentinel=-1)
    """Sequences per optimizer step over all data-parallel ranks; -1 means local_batch_size x data-parallel degree."""

    local_batch_size: int = _bounded(1, ge=1)
    """Sequences per data-parallel rank per forward/backward pass."""

    steps: int = _bounded(100, ge=1)
    """Number of optimizer steps to train."""

    lr: float = _bounded(3e-4, gt=0)
    """Peak learning rate of AdamW."""

    warmup_steps: int = _bounded(10, ge=0)
    """Steps of linear warmup from 0 to lr (a run shorter than this ends during warmup)."""

    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay of the learning rate after warmup, down to min_lr_ratio x lr ("constant" keeps lr)."""

    min_lr_ratio: float = _bounded(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr, for the "cosine" and "linear" schedules."""

    weight_decay: float = _bounded(0.1, ge=0)
    """AdamW decoupled weight decay."""

    beta1: float = _bounded(0.9, ge=0, lt=1)
    """AdamW beta1 (decay rate of the first-moment estimate)."""

    beta2: float = _bounded(0.95, ge=0, lt=1)
    """AdamW beta2 (decay rate of the second-moment estimate)."""

    max_norm: float = _bounded(1.0, ge=0)
    """Gradient clipping: maximum global gradient norm; 0 disables clipping."""

    seed: int = 0
    """Random seed for weight init and data; the same seed gives the same full weights for any degrees."""

    mixed_precision_param: Literal["float32", "bfloat16"] = "float32"
    """Dtype of parameters in forward/backward compute (FSDP mixed precision); reductions stay float32."""

    deterministic: bool = False
    """Use deterministic algorithms (torch.use_deterministic_algorithms), trading speed for repeatability."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    """What to do on a NaN/Inf loss or gradient norm: "stop" the run with an error, or "skip" the step."""


@dataclass
class Parallelism:
    """Parallel degrees; their product is the world size (data_parallel_degree -1 absorbs the rest)."""

    data_parallel_degree: int = _bounded(-1, ge=1, sentinel=-1)
    """Data-parallel (FSDP) degree; -1 infers it as world size / (cp x tp x pp)."""

    context_parallel_degree: int = _bounded(1, ge=1)
    """Context-parallel degree: ranks that split each sequence; 1 turns CP off."""

    context_parallel_layout: Literal["auto", "zigzag", "contiguous", "balanced"] = "auto"
    """How tokens map to CP ranks: "zigzag" balances causal work over one sequence, "contiguous" cuts it in cp pieces, "balanced" plans each batch from its documents (equal attention work, documents kept whole where possible); "auto" = "balanced" for document_causal, else "zigzag"."""

    context_parallel_comm: Literal["p2p", "allgather", "alltoall", "hybrid", "auto"] = "p2p"
    """How CP ranks exchange attention inputs: "p2p" ring passes of keys/values (overlapped with compute), one "allgather" of all keys/values, "alltoall" (Ulysses: heads sharded over the whole sequence; query heads per tp rank must divide by cp), "hybrid" (all-to-all inside groups of context_parallel_a2a_degree consecutive ranks, the ring across groups), or "auto": the cost model picks one (and the group size) from heads, KV heads, head dim, seq_len, cp, tp, dtype and the hardware; the log shows the choice and every alternative's predicted time."""

    context_parallel_a2a_degree: int = _bounded(0, ge=0)
    """Ranks per all-to-all group of comm "hybrid" (a divisor of context_parallel_degree, 1 < k < cp); 0: the cost model picks it. Only with comm "hybrid"."""

    context_parallel_cost_hardware: str = "auto"
    """Hardware the cost model of comm "auto" / "hybrid" prices: "auto" (by device: cpu, or h200 / h100 / a100 by GPU name), a preset name, or a calibration JSON from scripts/plan.py --calibrate."""

    context_parallel_backend: Literal["auto", "flash", "cudnn", "efficient", "cpu_flash", "math"] = "auto"
    """Attention kernel of the CP ring: "auto" picks from device and dtype (CPU: cpu_flash; CUDA bf16/fp16:
    flash; CUDA fp32: efficient); flash, cudnn and efficient need CUDA, cpu_flash a CPU; math is a slow check."""

    tensor_parallel_degree: int = _bounded(1, ge=1)
    """Tensor-parallel degree (with sequence parallelism); 1 turns TP off."""

    pipeline_parallel_degree: int = _bounded(1, ge=1)
    """Pipeline-parallel degree (number of stages); 1 turns PP off."""

    pipeline_parallel_schedule: Literal["1F1B", "GPipe", "Interleaved1F1B"] = "1F1B"
    """Pipeline schedule (torch.distributed.pipelining) when pipeline_parallel_degree > 1."""

    pipeline_parallel_microbatches: int = _bounded(-1, ge=1, sentinel=-1)
    """Microbatches per local batch under PP; -1 uses pipeline_parallel_degree. Must divide local_batch_size."""


@dataclass
class ActivationCheckpoint:
    """Activation checkpointing (recompute activations in backward to save memory)."""

    mode: Literal["none", "selective", "full"] = "none"
    """Which blocks to checkpoint: "none", "selective" (every N-th, see selective_ac_option) or "full" (all)."""

    selective_ac_option: str = "2"
    """For mode "selective": checkpoint every N-th transformer block, N a positive integer written as a string."""


@dataclass
class Compile:
    """torch.compile of the transformer blocks (one graph per block, CP attention inside it as custom ops)."""

    enable: bool = False
    """Compile every transformer block with torch.compile(fullgraph=True), after TP, CP and activation checkpointing and before FSDP2. On CPU inductor needs a C++ compiler (g++ or $CXX)."""

    backend: Literal["inductor", "aot_eager"] = "inductor"
    """torch.compile backend: "inductor" (generated kernels; fuses norms, rotary and SwiGLU) or "aot_eager" (traces and runs the same ops eagerly: a quick check that a model compiles)."""


@dataclass
class Data:
    """Training data."""

    dataset: Literal["synthetic_recall", "text"] = "synthetic_recall"
    """Dataset: "synthetic_recall" (generated key-value recall task, no files) or "text" (files in data.paths)."""

    paths: list[str] = field(default_factory=list)
    """Text or JSONL files for dataset "text"; on the command line, comma-separated."""

    jsonl_field: str = "text"
    """Field of each JSONL record that holds the text (for .jsonl files)."""

    tokenizer: str = "byte"
    """Tokenizer of dataset "text": "byte" (UTF-8 bytes + BOS/EOS, 258 ids) or the path of a HuggingFace tokenizer.json (or of the folder holding it, e.g. torchtitan's hf_assets_path); needs pip install "cp_dtensor[hf]", and the model's vocab_size must cover its ids."""

    reset_positions: bool = False
    """Restart the rotary positions at 0 at each document start in a sample; false: the global positions 0..seq_len-1. Not yet with document_causal or a sliding window (their attention takes the positions as the tokens' places in the sequence)."""

    recall_documents: Literal["same", "split"] = "same"
    """Documents of each synthetic_recall sample: "same" (one) or "split" (two, cut after the cue region, so that under model.attention_mask "document_causal" the queries cannot see their cue and the loss stays at chance)."""


@dataclass
class Checkpoint:
    """Distributed checkpointing (torch.distributed.checkpoint)."""

    enable: bool = False
    """Save checkpoints, and resume from the latest one in folder if there is one."""

    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder."""

    interval: int = _bounded(500, ge=1)
    """Save a checkpoint every this many steps (and at the last step)."""

    keep_latest_k: int = _bounded(0, ge=0)
    """Keep only the newest k checkpoints; 0 keeps all."""

    load_step: int = _bounded(-1, ge=0, sentinel=-1)
    """Step of the checkpoint to resume from; -1 takes the latest."""


@dataclass
class Metrics:
    """Logging of loss, throughput and memory."""

    log_freq: int = _bounded(10, ge=1)
    """Log metrics every this many steps (and at the first and last step)."""

    enable_tensorboard: bool = False
    """Also write metrics as TensorBoard events."""

    save_tb_folder: str = "tb"
    """TensorBoard folder, relative to job.dump_folder."""

    log_file: str = "train_log.jsonl"
    """Metrics log, relative to job.dump_folder; one JSON line per logged step."""


@dataclass
class Comm:
    """Process-group timeouts."""

    init_timeout_seconds: int = _bounded(300, ge=1)
    """Timeout of process-group initialization and the first collectives, in seconds."""

    train_timeout_seconds: int = _bounded(100, ge=1)
    """Collective timeout during training, in seconds; a failed rank makes the others exit within this."""


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

    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    """[checkpoint] section."""

    metrics: Metrics = field(default_factory=Metrics)
    """[metrics] section."""

    comm: Comm = field(default_factory=Comm)
    """[comm] section."""

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
            parallel.context_parallel_a2a_degree,
            parallel.context_parallel_degree,
            parallel.context_parallel_comm,
        )
        if a2a and comm != "hybrid":
            raise ConfigError(
                f'parallelism.context_parallel_a2a_degree={a2a} applies only to context_parallel_comm = "hybrid" '
                f'(got "{comm}"); set it to 0 or use comm "hybrid"'
            )
        if a2a and (a2a < 2 or a2a >= cp or cp % a2a):
            divisors = [k for k in range(2, cp) if cp % k == 0]
            raise ConfigError(
                f"parallelism.context_parallel_a2a_degree={a2a} must divide context_parallel_degree={cp} with "
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

        if self.data.dataset == "text" and not self.data.paths:
            raise ConfigError(
                'data.paths: dataset "text" needs at least one file; set data.paths = ["corpus.jsonl"] '
                "in TOML or --data.paths a.txt,b.jsonl"
            )


# --------------------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> Mapping[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field.

    Args:
        cls: A dataclass defined in a source file (e.g. :class:`Training`).

    Returns:
        Read-only ``{field name: docstring}`` (cleaned with :func:`inspect.cleandoc`); fields without a
        docstring are missing. Empty if the source is unavailable. Computed once per class.
    """
    return _field_docs_cached(cls)


@functools.cache
def _field_docs_cached(cls: type) -> Mapping[str, str]:
    """Parse ``cls``'s source once; the result is immutable, so the memo holds no mutable state."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return types.MappingProxyType({})
    class_def = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    docs: dict[str, str] = {}
    for node, following in zip(class_def.body, class_def.body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return types.MappingProxyType(docs)


@functools.cache
def _field_types(cls: type) -> Mapping[str, Any]:
    """Resolved field annotations of a dataclass (immutable memo)."""
    hints = typing.get_type_hints(cls)
    return types.MappingProxyType({f.name: hints[f.name] for f in dataclasses.fields(cls)})


def _section_types() -> Mapping[str, type]:
    """``{section name: section dataclass}`` in declaration order."""
    return _field_types(JobConfig)


def _suggest_multiples(value: int, unit: int) -> str:
    """``"use 96 or 104"``: the nearest multiples of ``unit`` around ``value`` (positive ones only)."""
    lower = value // unit * unit
    return f"use {lower} or {lower + unit}" if lower > 0 else f"use {lower + unit}"


# --------------------------------------------------------------------------------------------------------
# Types: checking TOML values, parsing command-line text
# --------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """Short name of a field type for messages and help: ``int``, ``list[str]``, ``"a"|"b"``."""
    if typing.get_origin(tp) is Literal:
        return "|".join(f'"{choice}"' for choice in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", repr(tp))


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    """``training.steps: expected int, got 'abc' (str)`` plus a hint where the fix is not obvious."""
    message = f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    name = key.split(".", 1)[1]
    if tp is str:
        message += f'; quote it in TOML: {name} = "{value}"'
    elif typing.get_origin(tp) is list and isinstance(value, str):
        message += f'; write a list in TOML: {name} = ["{value}"], or --{key} a,b on the command line'
    return ConfigError(message)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against field type ``tp``; return it (ints for float fields become floats).

    Raises:
        ConfigError: Wrong type (bools are not ints), a value outside a Literal's choices, or a
            non-finite float.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        listed = ", ".join(f'"{choice}"' for choice in choices)
        raise ConfigError(f"{key}: {value!r} is not one of {listed}; pick one of these")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError:  # an int beyond the float range
                as_float = math.inf
            if not math.isfinite(as_float):
                raise ConfigError(f"{key}: expected a finite float, got {value!r}")
            return as_float
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
    else:
        raise TypeError(f"{key}: unsupported config field type {tp!r}")
    raise _type_error(key, tp, value)


def _parse_text(key: str, text: str, tp: Any) -> Any:
    """Convert command-line text to a value of field type ``tp`` and check it.

    Bools accept true/false/1/0/yes/no (any case); lists are comma-separated (blank items dropped).
    """
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise ConfigError(f"{key}: expected bool (true/false/1/0/yes/no), got {text!r} (str)")
    if tp is int or tp is float:
        try:
            value = tp(text)
        except ValueError:
            raise _type_error(key, tp, text) from None
        return _check_type(key, value, tp)
    if typing.get_origin(tp) is list:
        return _check_type(key, [item.strip() for item in text.split(",") if item.strip()], tp)
    return _check_type(key, text, tp)


# --------------------------------------------------------------------------------------------------------
# Unknown names
# --------------------------------------------------------------------------------------------------------


def _closest(name: str, candidates: Sequence[str]) -> str | None:
    """The closest candidate to ``name`` by :mod:`difflib`, or None."""
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _all_keys() -> list[str]:
    """Every ``section.key``."""
    return [f"{name}.{key}" for name, cls in _section_types().items() for key in _field_types(cls)]


def _unknown_section_error(name: str, prefix: str, where: str) -> ConfigError:
    """Error for an unknown section; suggests the closest section, or the section that owns a bare key."""
    sections = list(_section_types())
    owners = [section for section, cls in _section_types().items() if name in _field_types(cls)]
    if owners:
        fix = f"{name} belongs in a section: use {prefix}{owners[0]}.{name}"
    else:
        close = _closest(name, sections)
        fix = f"did you mean {prefix}{close}?" if close else f"valid sections: {', '.join(sections)}"
    return ConfigError(f"unknown config section {name!r} {where}; {fix}")


def _unknown_key_error(section: str, key: str, prefix: str, where: str) -> ConfigError:
    """Error for an unknown key, with a suggestion.

    Suggests, in order: the same key in another section, the closest key of this section, the closest
    ``section.key`` overall.
    """
    full = f"{section}.{key}"
    elsewhere = [k for k in _all_keys() if k.endswith(f".{key}")]
    own = _closest(key, list(_field_types(_section_types()[section])))
    close = elsewhere[0] if elsewhere else f"{section}.{own}" if own else _closest(full, _all_keys())
    fix = f"did you mean {prefix}{close}?" if close else f"see --help for the keys of [{section}]"
    return ConfigError(f"unknown config key {prefix}{full} {where}; {fix}")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _apply_mapping(config: JobConfig, data: Mapping[str, Any], source: str) -> None:
    """Type-check ``{section: {key: value}}`` and set it on ``config`` (no range checks yet)."""
    sections = _section_types()
    for name, table in data.items():
        if name not in sections:
            raise _unknown_section_error(name, prefix="", where=f"in {source}")
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"{name}: expected a table in {source}, got {table!r}; write a [{name}] header "
                f"followed by key = value lines"
            )
        section = getattr(config, name)
        hints = _field_types(sections[name])
        for key, value in table.items():
            if key not in hints:
                raise _unknown_key_error(name, key, prefix="", where=f"in {source}")
            setattr(section, key, _check_type(f"{name}.{key}", value, hints[key]))


def _read_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file.

    Raises:
        ConfigError: If the file is missing, unreadable or not valid TOML.
    """
    if not path:
        raise ConfigError(
            "--config: empty path; pass a TOML file, e.g. --config train_configs/debug_cpu.toml"
        )
    try:
        with Path(path).open("rb") as f:
            return tomli.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"--config: file {path!r} not found; pass an existing TOML file, e.g. train_configs/debug_cpu.toml"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"--config: cannot read {path!r} ({e.strerror or e}); pass a readable TOML file"
        ) from None
    except tomli.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}; fix the syntax there") from None


def _split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """Split argv into the ``--config`` path and ``(option name, text or None)`` overrides, in order.

    An option takes the text after ``=``, else the next token unless that starts with ``--``; otherwise
    it has no value (None), which only a bool field accepts.
    """
    config_path: str | None = None
    overrides: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument {token!r}; use --config PATH and --section.key VALUE (see --help)"
            )
        name, has_eq, inline = token[2:].partition("=")
        value: str | None
        if has_eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            value, i = None, i + 1
        if name == "config":
            if value is None:
                raise ConfigError("--config needs a path: --config PATH or --config=PATH")
            config_path = value
        else:
            overrides.append((name, value))
    return config_path, overrides


def _parse_override(name: str, text: str | None) -> tuple[str, str, Any]:
    """Resolve ``--section.key`` and convert its text; returns ``(section, key, value)``."""
    section, dot, key = name.partition(".")
    sections = _section_types()
    if not dot or not key:
        owners = [s for s, cls in sections.items() if name in _field_types(cls)]
        fix = f"did you mean --{owners[0]}.{name}?" if owners else "options are --section.key (see --help)"
        raise ConfigError(f"unknown option --{name}; {fix}")
    if section not in sections:
        raise _unknown_section_error(section, prefix="--", where=f"in option --{name}")
    hints = _field_types(sections[section])
    if key not in hints:
        raise _unknown_key_error(section, key, prefix="--", where="on the command line")
    tp = hints[key]
    if text is None:
        if tp is not bool:
            raise ConfigError(f"--{name} needs a value: --{name} VALUE or --{name}=VALUE")
        return section, key, True
    return section, key, _parse_text(name, text, tp)


def load_config(argv: Sequence[str] | None = None) -> JobConfig:
    """Build the job config from defaults, an optional TOML file and command-line overrides.

    Precedence: command line > TOML > defaults (see Note [Config precedence]). A bool option without a
    value means true; list options take comma-separated values; ``-h``/``--help`` prints every option and
    exits.

    Args:
        argv: Arguments without the program name, e.g. ``["--config", "x.toml", "--training.steps=10"]``;
            None reads ``sys.argv[1:]``.

    Returns:
        The validated config.

    Raises:
        ConfigError: On a missing or invalid TOML file, an unknown section or key, a wrong type, a missing
            value, or a failed :meth:`JobConfig.validate`.
        SystemExit: With code 0 after printing help for ``-h``/``--help``.
    """
    if argv is None:
        argv = sys.argv[1:]
    if any(token in _HELP_FLAGS for token in argv):
        print(format_help())
        raise SystemExit(0)

    config_path, raw_overrides = _split_argv(argv)
    # Resolve the command line before reading the file, so a typo fails before any I/O.
    overrides = [_parse_override(name, text) for name, text in raw_overrides]

    config = JobConfig()
    if config_path is not None:
        _apply_mapping(config, _read_toml(config_path), source=f"config file {config_path}")
    for section, key, value in overrides:
        setattr(getattr(config, section), key, value)
    config.validate()
    return config


# --------------------------------------------------------------------------------------------------------
# Output: help text and TOML
# --------------------------------------------------------------------------------------------------------

_TOML_ESCAPES = types.MappingProxyType(
    {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
)


def _toml_value(value: Any) -> str:
    """One config value as TOML text (bool, int, float, str, list of these)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        chars = (
            _TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
            for ch in value
        )
        return '"' + "".join(chars) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def dump_toml(config: JobConfig) -> str:
    """The config as TOML text that :func:`load_config` reads back to an equal config.

    Args:
        config: The config to write (usually the effective one, to save next to the run's outputs).

    Returns:
        TOML text with every section and key.
    """
    lines = ["# cp_dtensor job config"]
    for name in _section_types():
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        lines += [f"{f.name} = {_toml_value(getattr(section, f.name))}" for f in dataclasses.fields(section)]
    return "\n".join(lines) + "\n"


def format_help(prog: str = "train.py") -> str:
    """Help text: every option as ``--section.key  (type, default X)  docstring``, grouped by section.

    Args:
        prog: Program name shown in the usage line.

    Returns:
        The help text.
    """
    lines = [
        f"usage: {prog} [--config PATH] [--section.key VALUE | --section.key=VALUE ...]",
        "",
        "Values come from the defaults, then the TOML file, then the command line (later wins).",
        "A bool option without a value means true (also true/false/1/0/yes/no); lists are comma-separated.",
        "",
        "  --config PATH  TOML job config file; without it, the defaults below",
        "  -h, --help     print this help and exit",
    ]
    for name, summary, rows in _option_rows():
        lines += ["", f"[{name}]  {summary}".rstrip()]
        # Align the columns within a section.
        width = max(len(option) for option, _, _ in rows)
        detail_width = max(len(details) for _, details, _ in rows) + 2
        lines += [
            f"  {option:<{width}}  {'(' + details + ')':<{detail_width}}  {doc}".rstrip()
            for option, details, doc in rows
        ]
    return "\n".join(lines)


def _option_rows() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """Per section: (name, one-line summary, [(--section.key, "type, default X[, range]", docstring)])."""
    sections = []
    for name, cls in _section_types().items():
        summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
        docs, hints = field_docs(cls), _field_types(cls)
        rows: list[tuple[str, str, str]] = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            details = f"{_type_name(hints[f.name])}, default {_toml_value(default)}"
            bounds: _Range | None = f.metadata.get("range")
            if bounds is not None:
                details += f", {bounds.describe()}"
            rows.append((f"--{name}.{f.name}", details, " ".join(docs.get(f.name, "").split())))
        sections.append((name, summary, rows))
    return sections


def format_markdown_reference() -> str:
    """The config reference as a markdown table (the README embeds exactly this)."""
    lines = ["| option | type, default | meaning |", "|---|---|---|"]
    for _name, _summary, rows in _option_rows():
        for option, details, doc in rows:
            lines.append(f"| `{option[2:]}` | {details.replace('|', '/')} | {doc.replace('|', '/')} |")
    return "\n".join(lines)
