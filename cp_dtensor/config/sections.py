"""The sections of a job config: one dataclass per TOML table (``[job]``, ``[model]``, ...).

Every field carries an attribute docstring (the string literal right after it), which ``--help`` and the
README's config reference print (:mod:`cp_dtensor.config.docs`); ranges are declared with ``_bounded``
and checked by :meth:`cp_dtensor.config.schema.JobConfig.validate`.
"""

from dataclasses import dataclass, field
from typing import Literal

from cp_dtensor.config.fields import _bounded

__all__ = [
    "ActivationCheckpoint",
    "Checkpoint",
    "Compile",
    "Data",
    "Job",
    "Metrics",
    "Model",
    "Parallelism",
    "Timeouts",
    "Training",
    "Validation",
]


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

    name: str = "llama3"
    """Model family, a name in the model registry (cp_dtensor.models.model_names()): "llama3" (cp_dtensor's Llama 3), "qwen3" (Qwen3 dense), "torchtitan.llama3" (torchtitan's Llama 3 definition; needs pip install "cp_dtensor[torchtitan]"; flavors debugmodel, 8B, 70B, 405B), or a family registered with cp_dtensor.models.register_model."""

    flavor: str = "debug"
    """Size preset of the model family (e.g. "debug", "8B"), or "hf": the architecture of the HuggingFace config.json in hf_assets_path; see cp_dtensor.models for the lists."""

    hf_assets_path: str = ""
    """HuggingFace model folder (config.json, tokenizer.json, *.safetensors): the architecture for flavor "hf", the tokenizer when data.tokenizer is "byte" (the default), and the weights for checkpoint.initial_load_in_hf when checkpoint.initial_load_path is empty."""

    rope_theta: float = _bounded(0.0, ge=0.0)
    """RoPE base replacing the flavor's / config.json's (context extension, e.g. a larger theta); 0 keeps it."""

    rope_type: Literal["", "default", "linear", "dynamic", "llama3", "yarn"] = ""
    """RoPE scaling replacing the model's: "linear", "dynamic" (NTK), "llama3" (Llama 3.1), "yarn", "default" (none); "" keeps it. Unset rope_* values come from the model's scaling (the trained context: its original_max_position_embeddings, else its max_seq_len)."""

    rope_factor: float = _bounded(0.0, ge=0.0)
    """RoPE scaling factor (context extension ratio); 0 keeps the model's."""

    rope_original_max_position_embeddings: int = _bounded(0, ge=0)
    """Context the model was trained on, that the RoPE scaling extends; 0 keeps the model's."""

    rope_low_freq_factor: float = _bounded(0.0, ge=0.0)
    """RoPE "llama3": wavelengths above original context / this are interpolated; 0 keeps the model's."""

    rope_high_freq_factor: float = _bounded(0.0, ge=0.0)
    """RoPE "llama3": wavelengths below original context / this are kept; 0 keeps the model's."""

    rope_beta_fast: float = _bounded(0.0, ge=0.0)
    """RoPE "yarn": pairs turning more often than this over the original context are kept; 0 keeps the model's (32)."""

    rope_beta_slow: float = _bounded(0.0, ge=0.0)
    """RoPE "yarn": pairs turning less often than this are interpolated; 0 keeps the model's (1)."""

    rope_attention_factor: float = _bounded(0.0, ge=0.0)
    """RoPE "yarn": multiplier of cos and sin; 0 keeps the model's (default 0.1 ln(factor) + 1)."""

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

    context_parallel_comm: str = "p2p"
    """The CP strategy (any name of cp_dtensor.strategy_names(), or "auto"): "p2p" ring passes of keys/values (overlapped with compute), one "allgather" of all keys/values, "alltoall" (Ulysses: heads sharded over the whole sequence; query heads per tp rank must divide by cp), "hybrid" (all-to-all inside groups of context_parallel_a2a_size consecutive ranks, the ring across groups), or "auto": the cost model picks one (and the group size) from heads, KV heads, head dim, seq_len, cp, tp, dtype and the hardware; the log shows the choice and every alternative's predicted time."""

    context_parallel_a2a_size: int = _bounded(0, ge=0)
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

    dataset: Literal["synthetic_recall", "text", "hf", "sft"] = "synthetic_recall"
    """Dataset: "synthetic_recall" (generated key-value recall task, no files), "text" (.txt / .jsonl files in data.paths), "hf" (parquet / JSON / JSONL / arrow files or a dataset folder in data.paths, streamed by HuggingFace datasets; needs pip install "cp_dtensor[hf]"), or "sft" (JSONL prompt/completion records in data.paths, packed whole; the loss counts completion tokens only). "text" and "hf" are tokenized once into data.cache_dir and packed with document ids (docs/data.md)."""

    sft_prompt_field: str = "prompt"
    """Dataset "sft": the JSONL field holding the prompt (no loss on its tokens)."""

    sft_completion_field: str = "completion"
    """Dataset "sft": the JSONL field holding the completion (the loss counts its tokens and the EOS after it)."""

    paths: list[str] = field(default_factory=list)
    """Files or folders of datasets "text" / "hf" / "sft", read in this order; on the command line, comma-separated."""

    jsonl_field: str = "text"
    """Field of each JSONL record (dataset "text") or dataset row (dataset "hf") that holds the text."""

    cache_dir: str = "token_cache"
    """Folder of the token cache of datasets "text" / "hf" (memory-mapped token shards + document offsets), relative to job.dump_folder unless absolute; every rank must see it. Built once by all ranks together (or ahead of time by scripts/pretokenize.py) and reused while the files, tokenizer and text field are unchanged."""

    tokenizer: str = "byte"
    """Tokenizer of datasets "text", "hf" and "sft" (and of validation.paths): "byte" (UTF-8 bytes + BOS/EOS, 258 ids) or the path of a HuggingFace tokenizer.json (or of the folder holding it, e.g. torchtitan's hf_assets_path); needs pip install "cp_dtensor[hf]", and the model's vocab_size must cover its ids. With model.hf_assets_path set, "byte" means that folder's tokenizer.json."""

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

    initial_load_path: str = ""
    """Weights to start from when folder holds no checkpoint to resume: a HuggingFace folder (with initial_load_in_hf) or a cp_dtensor checkpoint step folder (model weights only)."""

    initial_load_in_hf: bool = False
    """initial_load_path is a HuggingFace folder (safetensors); each rank reads only its shards. With initial_load_path empty, model.hf_assets_path is loaded."""

    last_save_in_hf: bool = False
    """Also write the last checkpoint as a HuggingFace folder (config.json + safetensors, loadable by transformers) in folder/step-N-hf."""

    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the weights written by last_save_in_hf."""

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
class Timeouts:
    """Process-group timeouts."""

    init_seconds: int = _bounded(300, ge=1)
    """Timeout of process-group initialization and the first collectives, in seconds."""

    train_seconds: int = _bounded(100, ge=1)
    """Collective timeout during training, in seconds; a failed rank makes the others exit within this."""
