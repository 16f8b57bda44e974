"""The job config schema: one dataclass per TOML section, :class:`JobConfig`, and its validation.

Every field carries an attribute docstring (the string literal right after it), which ``--help`` and the
README's config reference print (:mod:`cp_dtensor.config.docs`).
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from cp_dtensor.config.fields import (
    ConfigError,
    _bounded,
    _check_type,
    _field_types,
    _Range,
    _unknown_key_error,
    _unknown_section_error,
)
from cp_dtensor.parallel_dims import seq_len_problem

__all__ = [
    "ActivationCheckpoint",
    "Checkpoint",
    "Comm",
    "Compile",
    "Data",
    "Job",
    "JobConfig",
    "Metrics",
    "Model",
    "Parallelism",
    "Training",
    "Validation",
]


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

    dataset: Literal["synthetic_recall", "text", "hf"] = "synthetic_recall"
    """Dataset: "synthetic_recall" (generated key-value recall task, no files), "text" (.txt / .jsonl files in data.paths) or "hf" (parquet / JSON / JSONL / arrow files or a dataset folder in data.paths, streamed by HuggingFace datasets; needs pip install "cp_dtensor[hf]"). "text" and "hf" are tokenized once into data.cache_dir and packed with document ids (docs/data.md)."""

    paths: list[str] = field(default_factory=list)
    """Files or folders of dataset "text" / "hf", read in this order; on the command line, comma-separated."""

    jsonl_field: str = "text"
    """Field of each JSONL record (dataset "text") or dataset row (dataset "hf") that holds the text."""

    cache_dir: str = "token_cache"
    """Folder of the token cache of datasets "text" / "hf" (memory-mapped token shards + document offsets), relative to job.dump_folder unless absolute; every rank must see it. Built once by all ranks together (or ahead of time by scripts/pretokenize.py) and reused while the files, tokenizer and text field are unchanged."""

    tokenizer: str = "byte"
    """Tokenizer of dataset "text": "byte" (UTF-8 bytes + BOS/EOS, 258 ids) or the path of a HuggingFace tokenizer.json (or of the folder holding it, e.g. torchtitan's hf_assets_path); needs pip install "cp_dtensor[hf]", and the model's vocab_size must cover its ids."""

    reset_positions: bool = False
    """Restart the rotary positions at 0 at each document start in a sample; false: the global positions 0..seq_len-1. Works with every mask and layout, document_causal and sliding windows included (attention keeps the tokens' places in the sequence; only RoPE sees the per-document positions)."""

    recall_documents: Literal["same", "split"] = "same"
    """Documents of each synthetic_recall sample: "same" (one) or "split" (two, cut after the cue region, so that under model.attention_mask "document_causal" the queries cannot see their cue and the loss stays at chance)."""


@dataclass
class Validation:
    """Validation loss on held-out documents during training: forward only, under the training layout."""

    enable: bool = False
    """Compute the validation loss every validation.freq steps and after the last step."""

    freq: int = _bounded(10, ge=1)
    """Validate every this many training steps."""

    steps: int = _bounded(-1, ge=1, sentinel=-1)
    """Validation batches per run, the first ones of validation.paths in file order (the same every run); -1: every full batch the files hold."""

    paths: list[str] = field(default_factory=list)
    """Held-out .txt / .jsonl files, tokenized with data.tokenizer (data.jsonl_field, data.cache_dir) and packed with document ids as data "text"; on the command line, comma-separated."""

    seq_len: int = _bounded(-1, ge=1, sentinel=-1)
    """Tokens per validation sequence; -1: training.seq_len. The same multiple as training.seq_len is required (cp, tp, layout); under PP it must equal training.seq_len."""

    local_batch_size: int = _bounded(-1, ge=1, sentinel=-1)
    """Validation sequences per data-parallel rank per forward; -1: training.local_batch_size (under PP it must equal it)."""


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

    allow_mask_change: bool = False
    """Resume a checkpoint saved with other attention-mask settings (model.attention_mask, sliding_window, sliding_window_layers), with a warning; false refuses such a resume in one line naming the old and new values."""


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

    validation: Validation = field(default_factory=Validation)
    """[validation] section."""

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

        self._validate_validation()

        if self.data.dataset in ("text", "hf") and not self.data.paths:
            example = "corpus.jsonl" if self.data.dataset == "text" else "corpus.parquet"
            raise ConfigError(
                f'data.paths: dataset "{self.data.dataset}" needs at least one file; set data.paths = '
                f'["{example}"] in TOML or --data.paths a,b on the command line'
            )

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
