"""The training loop: config -> mesh -> parallelized model -> data -> steps -> metrics -> checkpoints.

Runs on every rank with the default process group initialized (``cp_dtensor.launch`` does that for
``train.py``, under torchrun or by spawning local CPU processes).

Note [Trainer step]
~~~~~~~~~~~~~~~~~~~
::

    global batch k (same on every rank; depends only on seed and k)
      -> shard_batch: DTensors on ("dp", "cp", "tp"): rows of this dp rank, sequence shards of this cp
         rank (layout order, positions follow; Note [Layout-ordered DTensors])
      -> train_step: accumulation chunks of local_batch_size rows (PP: pipeline microbatches)
         loss = sum CE / global token count; FSDP sums grads over dp x cp; clip; AdamW; LR schedule
      -> metrics (rank 0) -> checkpoint every `interval` steps and at the end
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cp_dtensor.attention.comm import RingStats
from cp_dtensor.checkpoint import CheckpointManager, ModelState, ObjectState, OptimizerState
from cp_dtensor.config import JobConfig
from cp_dtensor.data import GlobalBatchLoader, SyntheticRecallDataset, TextDataset, validate_token_ids
from cp_dtensor.metrics import MetricsLogger, StepMetrics, gpu_peak_tflops, peak_memory_bytes
from cp_dtensor.models.llama import LLAMA3_FLAVORS, ModelArgs, build_llama, model_flops_per_token
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.parallelize import ParallelModel, build_parallel_model
from cp_dtensor.pipeline import stages_per_rank
from cp_dtensor.sharding import shard_batch
from cp_dtensor.train_step import StepResult, train_step

__all__ = ["Trainer", "build_lr_lambda", "build_model", "model_args_for", "validate_job"]


def build_lr_lambda(steps: int, warmup: int, schedule: str, min_ratio: float):
    """LR multiplier per optimizer step: linear warmup to 1, then cosine/linear decay to ``min_ratio``."""

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant" or steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def validate_job(cfg: JobConfig, world_size: int) -> ParallelDims:
    """All checks that need the world size and the model shape, before any collective.

    Raises:
        ValueError: naming the value and the fix (degrees vs world size, seq_len multiple, heads vs tp,
            pp vs layers, batch vs dp and microbatches, unknown flavor).
    """
    par = cfg.parallelism
    pd = ParallelDims(
        dp=par.data_parallel_degree,
        pp=par.pipeline_parallel_degree,
        cp=par.context_parallel_degree,
        tp=par.tensor_parallel_degree,
        world_size=world_size,
        cp_layout=par.context_parallel_layout,
    )
    pd.validate_seq_len(cfg.training.seq_len)
    args = model_args_for(cfg)
    kv_heads = args.n_kv_heads or args.n_heads
    if args.n_heads % kv_heads:
        raise ValueError(
            f"model flavor {cfg.model.flavor!r}: n_heads {args.n_heads} is not a multiple of n_kv_heads {kv_heads}."
        )
    if args.n_heads % pd.tp or kv_heads % pd.tp:
        raise ValueError(
            f"parallelism.tensor_parallel_degree {pd.tp} must divide n_heads {args.n_heads} and n_kv_heads "
            f"{kv_heads} of flavor {cfg.model.flavor!r}."
        )
    stages = pd.pp * stages_per_rank(par.pipeline_parallel_schedule)
    if stages > args.n_layers:
        raise ValueError(
            f"parallelism.pipeline_parallel_degree {pd.pp} needs {stages} stages but flavor "
            f"{cfg.model.flavor!r} has only {args.n_layers} layers."
        )
    backend = par.context_parallel_backend
    if pd.cp_enabled and backend in ("flash", "cudnn", "efficient") and not torch.cuda.is_available():
        raise ValueError(
            f'parallelism.context_parallel_backend "{backend}" needs a CUDA GPU and none is visible; use "auto" '
            f'or "cpu_flash".'
        )
    if pd.cp_enabled and backend == "cpu_flash" and torch.cuda.is_available():
        raise ValueError(
            'parallelism.context_parallel_backend "cpu_flash" runs on CPU tensors but training runs on the GPU; '
            'use "auto", "flash", "cudnn" or "efficient".'
        )
    if cfg.data.dataset == "text":
        for path in map(Path, cfg.data.paths):
            if not path.exists():
                raise FileNotFoundError(f"data.paths: {path} does not exist.")
            if path.is_file() and path.stat().st_size == 0:
                raise ValueError(f"data.paths: {path} is empty.")
    gbs = _global_batch_size(cfg, pd)
    local_rows = gbs // pd.dp
    if gbs % pd.dp or local_rows % cfg.training.local_batch_size:
        raise ValueError(
            f"training.global_batch_size {gbs} must be a multiple of data_parallel_degree {pd.dp} x "
            f"local_batch_size {cfg.training.local_batch_size}."
        )
    return pd


def _torchtitan_integration() -> Any:
    try:
        from cp_dtensor.integrations import torchtitan
    except ImportError as e:
        raise ValueError(
            f'model.name "torchtitan.llama3" needs the torchtitan extra: pip install "cp_dtensor[torchtitan]" '
            f"(torchtitan>=0.2.2,<0.3); {e}"
        ) from None
    return torchtitan


def model_args_for(cfg: JobConfig) -> ModelArgs:
    """Shape of the model that ``cfg.model`` names (``name``, ``flavor``, ``attention_mask``).

    Raises:
        ValueError: unknown flavor; for "torchtitan.llama3" also a missing extra or a bidirectional mask.
    """
    if cfg.model.name == "torchtitan.llama3":
        return _torchtitan_integration().torchtitan_llama3_args(
            cfg.model.flavor, seq_len=cfg.training.seq_len, causal=cfg.model.attention_mask == "causal"
        )
    if cfg.model.flavor not in LLAMA3_FLAVORS:
        raise ValueError(
            f"model.flavor {cfg.model.flavor!r} is unknown; choose one of {sorted(LLAMA3_FLAVORS)}."
        )
    return LLAMA3_FLAVORS[cfg.model.flavor]


def build_model(cfg: JobConfig) -> nn.Module:
    """The model that ``cfg.model`` names, on the current default device: cp_dtensor's Llama ("llama3") or
    torchtitan's Llama 3 behind cp_dtensor's model interface ("torchtitan.llama3")."""
    causal = cfg.model.attention_mask == "causal"
    if cfg.model.name == "torchtitan.llama3":
        return _torchtitan_integration().build_torchtitan_llama3(
            cfg.model.flavor, seq_len=cfg.training.seq_len, causal=causal
        )
    return build_llama(cfg.model.flavor, causal=causal)


def _global_batch_size(cfg: JobConfig, pd: ParallelDims) -> int:
    gbs = cfg.training.global_batch_size
    return cfg.training.local_batch_size * pd.dp if gbs == -1 else gbs


@dataclass
class _Data:
    loader: GlobalBatchLoader
    chance_loss: float | None


def _build_data(cfg: JobConfig, vocab_size: int, global_batch_size: int) -> _Data:
    t = cfg.training
    if cfg.data.dataset == "text":
        dataset = TextDataset(cfg.data.paths, t.seq_len, text_field=cfg.data.jsonl_field)
        if dataset.vocab_size > vocab_size:
            raise ValueError(
                f"the byte tokenizer needs {dataset.vocab_size} token ids but flavor {cfg.model.flavor!r} has "
                f"vocab_size {vocab_size}."
            )
        chance = None
    else:
        # Keep the cue density of the default (4 copies per 256 tokens) at any length, so that the task's
        # difficulty comes from the distance between cue and query, not from a vanishing cue.
        dataset = SyntheticRecallDataset(
            t.seq_len, vocab_size, seed=t.seed, cue_repeats=max(4, t.seq_len // 64)
        )
        chance = dataset.chance_loss
    return _Data(GlobalBatchLoader(dataset, global_batch_size, seed=t.seed), chance)


class Trainer:
    """A torchtitan-style trainer for the Llama model with CP, TP, FSDP2, PP and AC from a :class:`JobConfig`.

    Args:
        cfg: the validated job config.
    """

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.parallel_dims = validate_job(cfg, world)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        t = cfg.training
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.parallel_dims.build_mesh(self.device.type)
        dump = Path(cfg.job.dump_folder)
        self.metrics = MetricsLogger(
            is_rank0=self.rank == 0,
            total_steps=t.steps,
            log_freq=cfg.metrics.log_freq,
            log_file=dump / cfg.metrics.log_file,
            tensorboard_dir=dump / cfg.metrics.save_tb_folder if cfg.metrics.enable_tensorboard else None,
        )
        self.ring_stats = RingStats() if self.parallel_dims.cp_enabled else None
        self.model_args, self.parallel_model = self._build_model()
        self.optimizers = [
            torch.optim.AdamW(
                part.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay, eps=1e-8
            )
            for part in self.parallel_model.model_parts
        ]
        lr_lambda = build_lr_lambda(t.steps, t.warmup_steps, t.lr_schedule, t.min_lr_ratio)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in self.optimizers]
        self.data = _build_data(cfg, self.model_args.vocab_size, _global_batch_size(cfg, self.parallel_dims))
        self.step = 0
        self.checkpoints = (
            CheckpointManager(
                dump / cfg.checkpoint.folder,
                keep_latest_k=cfg.checkpoint.keep_latest_k,
                log=self.metrics.info,
            )
            if cfg.checkpoint.enable
            else None
        )
        gbs = self.data.loader.global_batch_size
        self.accumulation_steps = gbs // self.parallel_dims.dp // t.local_batch_size
        self.flops_per_token = model_flops_per_token(self.model_args, t.seq_len)
        peak = gpu_peak_tflops()
        self.peak_flops = peak * 1e12 if peak else None

    # ---- construction ------------------------------------------------------------------------------
    def _build_model(self) -> tuple[Any, ParallelModel]:
        cfg, pd = self.cfg, self.parallel_dims
        causal = cfg.model.attention_mask == "causal"
        with torch.device("meta"):
            model = build_model(cfg)
        param_dtype = torch.bfloat16 if cfg.training.mixed_precision_param == "bfloat16" else None
        pm = build_parallel_model(
            model,
            pd,
            device=self.device,
            pp_schedule=cfg.parallelism.pipeline_parallel_schedule,
            pp_microbatches=cfg.parallelism.pipeline_parallel_microbatches,
            ac_mode=cfg.activation_checkpoint.mode,
            selective_ac_every=int(cfg.activation_checkpoint.selective_ac_option),
            cp_layout=cfg.parallelism.context_parallel_layout,
            cp_comm=cfg.parallelism.context_parallel_comm,
            cp_backend=None
            if cfg.parallelism.context_parallel_backend == "auto"
            else cfg.parallelism.context_parallel_backend,
            ring_stats=self.ring_stats,
            param_dtype=param_dtype,
        )
        for part in pm.model_parts:
            part.to_empty(device=self.device)
            part.init_weights(seed=cfg.training.seed)
        n_params = sum(p.numel() for p in model.parameters())
        self.metrics.info(
            f"model {cfg.model.name}/{cfg.model.flavor} ({n_params / 1e6:.2f}M params, "
            f"{'causal' if causal else 'bidirectional'}) | world {pd.world_size}: pp {pd.pp} dp {pd.dp} cp {pd.cp} "
            f"tp {pd.tp} | cp layout {cfg.parallelism.context_parallel_layout}, comm "
            f"{cfg.parallelism.context_parallel_comm}, backend {cfg.parallelism.context_parallel_backend} | ac {cfg.activation_checkpoint.mode} | seq_len "
            f"{cfg.training.seq_len} | device {self.device.type}"
        )
        return model.args, pm

    def _checkpoint_state(self) -> dict[str, Any]:
        parts = self.parallel_model.model_parts

        def get_train_state() -> dict[str, Any]:
            return {"step": self.step, "rng": torch.get_rng_state()}

        def put_train_state(state: dict[str, Any]) -> None:
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"])

        return {
            "model": ModelState(parts),
            "optimizer": OptimizerState(parts, self.optimizers),
            "lr_scheduler": ObjectState(self.schedulers[0].state_dict, self._load_schedulers),
            "dataloader": ObjectState(self.data.loader.state_dict, self.data.loader.load_state_dict),
            "train_state": ObjectState(get_train_state, put_train_state),
        }

    def _load_schedulers(self, state: dict[str, Any]) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)

    def _set_train_timeouts(self) -> None:
        """After the first step (process groups created, kernels warm), switch every group from
        ``comm.init_timeout_seconds`` to the shorter ``comm.train_timeout_seconds`` (as torchtitan does)."""
        if not dist.is_initialized():
            return
        timeout = timedelta(seconds=self.cfg.comm.train_timeout_seconds)
        groups = {dist.group.WORLD, *self.parallel_dims.world_mesh.get_all_groups()}
        groups.add(self.parallel_dims.fsdp_mesh.get_group())
        for group in groups:
            dist.distributed_c10d._set_pg_timeout(timeout, group)

    # ---- the loop ----------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load the latest usable checkpoint (or ``checkpoint.load_step``); returns its step or None."""
        if self.checkpoints is None:
            return None
        step = self.checkpoints.load(self._checkpoint_state(), self.cfg.checkpoint.load_step)
        if step is not None:
            self.metrics.info(f"resumed from {self.checkpoints.step_dir(step)} (step {step})")
        return step

    def save_checkpoint(self) -> None:
        """Save the current state as the checkpoint of the current step."""
        assert self.checkpoints is not None
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.step, self._checkpoint_state())
        self.metrics.info(f"saved checkpoint {path} in {time.perf_counter() - t0:.2f}s")

    def train_one_step(self) -> StepResult:
        """Run the next optimizer step and log it."""
        cfg, pd = self.cfg, self.parallel_dims
        t0 = time.perf_counter()
        ring_before = dataclasses.replace(self.ring_stats) if self.ring_stats is not None else None
        global_batch = next(self.data.loader)
        validate_token_ids(global_batch["tokens"], self.model_args.vocab_size)
        batch = shard_batch(
            {k: v.to(self.device) for k, v in global_batch.items()},
            pd.batch_mesh,
            layout=cfg.parallelism.context_parallel_layout,
        )
        try:
            result = train_step(
                self.parallel_model.model_parts,
                self.optimizers,
                batch,
                loss_mesh=pd.loss_mesh,
                pipeline=self.parallel_model.pipeline,
                max_norm=cfg.training.max_norm,
                accumulation_steps=self.accumulation_steps,
                on_nonfinite="skip" if cfg.training.on_nonfinite == "skip" else "raise",
            )
        except FloatingPointError as e:
            raise FloatingPointError(
                f'step {self.step + 1}: {e}; stopping (training.on_nonfinite = "stop"); the last checkpoint '
                f"holds the state before it"
            ) from None
        lr = self.schedulers[0].get_last_lr()[0]
        if not result.skipped:
            for s in self.schedulers:
                s.step()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = self.data.loader.global_batch_size * cfg.training.seq_len
        tps = tokens / dt
        per_dev = tps / pd.world_size
        achieved = per_dev * self.flops_per_token
        self.metrics.log(
            StepMetrics(
                step=self.step,
                loss=result.loss,
                grad_norm=result.grad_norm,
                lr=lr,
                tokens_per_s=tps,
                tokens_per_s_per_device=per_dev,
                tflops_per_device=achieved / 1e12,
                mfu=achieved / self.peak_flops if self.peak_flops else None,
                peak_memory_gib=peak_memory_bytes(self.device) / 2**30,
                step_time_s=dt,
                skipped=result.skipped,
                **self._ring_metrics(ring_before),
            )
        )
        return result

    def _ring_metrics(self, before: RingStats | None) -> dict[str, Any]:
        """This step's CP communication on this rank: bytes sent and time blocked waiting."""
        now = self.ring_stats
        if now is None or before is None:
            return {}
        sent = now.bytes_sent_forward + now.bytes_sent_backward
        return {
            "cp_bytes_sent": sent - before.bytes_sent_forward - before.bytes_sent_backward,
            "cp_comm_wait_s": now.comm_wait_seconds - before.comm_wait_seconds,
        }

    def train(self) -> list[StepResult]:
        """Resume if possible, train to ``training.steps``, checkpoint on the way; returns the step results."""
        cfg = self.cfg
        self.resume()
        if self.data.chance_loss is not None:
            self.metrics.info(
                f"data: synthetic long-range recall, chance loss {self.data.chance_loss:.4f} (answers sit "
                f"~{int(0.9 * cfg.training.seq_len)} tokens from their cue)"
            )
        results = []
        try:
            while self.step < cfg.training.steps:
                results.append(self.train_one_step())
                if len(results) == 1:
                    self._set_train_timeouts()
                if self.checkpoints is not None and (
                    self.step % cfg.checkpoint.interval == 0 or self.step == cfg.training.steps
                ):
                    self.save_checkpoint()
        finally:
            self.metrics.close()
        return results
