"""The training loop: :class:`Trainer` builds mesh, model, optimizer and data from a job config and runs
the steps (see Note [Trainer step] in :mod:`cp_dtensor.trainer`)."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cp_dtensor.attention.choice import CommChoice
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.balance import BalancedLayoutRule, layout_work, to_sequence_layout
from cp_dtensor.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    ModelState,
    ObjectState,
    OptimizerState,
    load_model_weights,
    model_fingerprint,
)
from cp_dtensor.config import JobConfig
from cp_dtensor.data import validate_token_ids
from cp_dtensor.layout import LayoutLike
from cp_dtensor.metrics import MetricsLogger, StepMetrics, gpu_peak_tflops, peak_memory_bytes
from cp_dtensor.models.accounting import model_flops_per_token
from cp_dtensor.models.hf import (
    load_hf_weights,
    read_hf_config,
    save_hf_weights,
    write_hf_config,
    write_index,
)
from cp_dtensor.parallelize import ParallelModel, build_parallel_model
from cp_dtensor.sharding import shard_batch
from cp_dtensor.train_step import StepResult, eval_step, train_step
from cp_dtensor.trainer.builders import DataPlacement, _build_data, build_lr_lambda, job_comm_choice
from cp_dtensor.trainer.checks import (
    _global_batch_size,
    attention_mask_settings,
    initial_hf_path,
    mask_change,
    validate_job,
)
from cp_dtensor.trainer.model_factory import build_model, model_spec_for
from cp_dtensor.trainer.validation import build_validation_data

__all__ = ["Trainer"]


class Trainer:
    """A torchtitan-style trainer for any registered model family with CP, TP, FSDP2, PP and AC from a
    :class:`JobConfig`.

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
        self.ring_stats = AttentionStats() if self.parallel_dims.cp_enabled else None
        self.use_documents = cfg.model.attention_mask == "document_causal"
        # A layout name, or for "balanced" the rule that plans each batch (shard_batch and the CP style).
        self.cp_layout: Any = cfg.cp_layout
        if cfg.cp_layout == "balanced":
            window = (
                (cfg.model.sliding_window - 1, 0)
                if cfg.model.sliding_window_layers == "all" and cfg.model.sliding_window
                else (-1, -1)
            )
            self.cp_layout = BalancedLayoutRule(
                is_causal=cfg.model.attention_mask != "bidirectional", window_size=window
            )
        self.model_args, self.parallel_model = self._build_model()
        self.optimizers = [
            torch.optim.AdamW(
                part.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay, eps=1e-8
            )
            for part in self.parallel_model.model_parts
        ]
        lr_lambda = build_lr_lambda(t.steps, t.warmup_steps, t.lr_schedule, t.min_lr_ratio)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in self.optimizers]
        pd = self.parallel_dims
        placement = DataPlacement(
            dp_rank=pd.world_mesh["dp"].get_local_rank() if dist.is_initialized() else 0,
            dp_degree=pd.dp,
            rank=self.rank,
            world_size=world,
            barrier=dist.barrier if dist.is_initialized() else None,
            log=self.metrics.info,
        )
        self.data = _build_data(cfg, self.model_args.vocab_size, _global_batch_size(cfg, pd), placement)
        self.validation = (
            build_validation_data(cfg, self.model_args.vocab_size, placement)
            if cfg.validation.enable
            else None
        )
        self.validation_losses: list[tuple[int, float]] = []  # (step, loss per token) of each run
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
        self.model_spec = model_spec_for(cfg)
        self._initial_load = initial_hf_path(cfg) or cfg.checkpoint.initial_load_path or None
        with torch.device("meta"):
            model = build_model(cfg)
        self.model_fingerprint = model_fingerprint(
            model,
            f"{cfg.model.name}/{cfg.model.flavor}",
            {"model.name": cfg.model.name, "model.flavor": cfg.model.flavor},
        )  # the whole model's parameter shapes, before PP splits it
        self.model_fingerprint["attention"] = attention_mask_settings(cfg)  # checked on resume
        param_dtype = torch.bfloat16 if cfg.training.mixed_precision_param == "bfloat16" else None
        comm = job_comm_choice(cfg, pd, model.args, self.device) if pd.cp_enabled else CommChoice("p2p", None)
        self.cp_comm = comm
        pm = build_parallel_model(
            model,
            pd,
            device=self.device,
            pp_schedule=cfg.parallelism.pipeline_parallel_schedule,
            pp_microbatches=cfg.parallelism.pipeline_parallel_microbatches,
            parallelize_fn=self.model_spec.parallelize,
            pipeline_split_fn=self.model_spec.pipeline_split,
            ac_mode=cfg.activation_checkpoint.mode,
            selective_ac_every=int(cfg.activation_checkpoint.selective_ac_option),
            cp_settings=CPSettings(
                layout=self.cp_layout,
                comm=comm.comm,
                a2a_size=comm.a2a_size,
                backend=None
                if cfg.parallelism.context_parallel_backend == "auto"
                else cfg.parallelism.context_parallel_backend,
                cost_hardware=cfg.parallelism.context_parallel_cost_hardware,
                stats=self.ring_stats,
            ),
            compile_backend=cfg.compile.backend if cfg.compile.enable else None,
            param_dtype=param_dtype,
        )
        # Weights come from the seeded init, or (Note [Loading a HuggingFace checkpoint into a sharded model])
        # from a checkpoint in resume(); the latter only need their buffers computed here.
        for part in pm.model_parts:
            part.to_empty(device=self.device)
            if self._initial_load is None:
                part.init_weights(seed=cfg.training.seed)
            else:
                part.init_buffers()
        n_params = sum(p.numel() for p in model.parameters())
        self.metrics.info(
            f"model {cfg.model.name}/{cfg.model.flavor} ({n_params / 1e6:.2f}M params, "
            f"{self._attention_summary()}) | world {pd.world_size}: pp {pd.pp} dp {pd.dp} cp {pd.cp} "
            f"tp {pd.tp} | cp layout {cfg.cp_layout}, comm {self._comm_summary()}, backend {cfg.parallelism.context_parallel_backend} | ac {cfg.activation_checkpoint.mode}"
            f"{f' | compile {cfg.compile.backend}' if cfg.compile.enable else ''} | seq_len "
            f"{cfg.training.seq_len} | device {self.device.type}"
        )
        if comm.reason:  # the cost model chose: say why, with every alternative's predicted time
            self.metrics.info(f"cp comm {cfg.parallelism.context_parallel_comm}: {comm.reason}")
            for line in comm.table:
                self.metrics.info(f"  predicted per attention layer (fwd+bwd): {line}")
        return model.args, pm

    def _comm_summary(self) -> str:
        named, comm = self.cfg.parallelism.context_parallel_comm, self.cp_comm
        text = comm.comm + (f" (a2a {comm.a2a_size})" if comm.a2a_size else "")
        return text if named == comm.comm and not comm.reason else f"{named} -> {text}"

    def _attention_summary(self) -> str:
        model = self.cfg.model
        text = model.attention_mask
        if model.sliding_window:
            text += f", sliding window {model.sliding_window} ({model.sliding_window_layers} layers)"
        return text

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
        ``timeouts.init_seconds`` to the shorter ``timeouts.train_seconds`` (as torchtitan does)."""
        if not dist.is_initialized():
            return
        timeout = timedelta(seconds=self.cfg.timeouts.train_seconds)
        groups = {dist.group.WORLD, *self.parallel_dims.world_mesh.get_all_groups()}
        groups.add(self.parallel_dims.fsdp_mesh.get_group())
        for group in groups:
            dist.distributed_c10d._set_pg_timeout(timeout, group)

    # ---- the loop ----------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load the latest usable checkpoint (or ``checkpoint.load_step``); returns its step or None.

        Without one, the initial weights are loaded when ``checkpoint.initial_load_path`` (or, with
        ``initial_load_in_hf``, ``model.hf_assets_path``) names them. A checkpoint saved under other attention
        mask settings is refused (or, with ``checkpoint.allow_mask_change``, loaded with a warning).
        """
        step = None
        if self.checkpoints is not None:
            step = self.checkpoints.load(
                self._checkpoint_state(), self.cfg.checkpoint.load_step, fingerprint=self.model_fingerprint
            )
        if step is not None:
            folder = self.checkpoints.step_dir(step)
            saved = json.loads((folder / MANIFEST).read_text()).get("fingerprint", {}).get("attention")
            allowed = self.cfg.checkpoint.allow_mask_change
            change = mask_change(saved, self.model_fingerprint["attention"], str(folder), allowed=allowed)
            if change is not None and not allowed:
                raise CheckpointError(change)
            if change is not None:
                self.metrics.info(f"warning: {change}")
            self.metrics.info(f"resumed from {folder} (step {step})")
        elif self._initial_load is not None:
            self.load_initial_weights(self._initial_load)
            self._initial_load = None
        return step

    def load_initial_weights(self, path: str) -> int:
        """Load the model weights of ``path``: a HuggingFace folder (``checkpoint.initial_load_in_hf``), each rank
        reading only its shards, or a cp_dtensor checkpoint step folder (weights only).

        Returns:
            Bytes this rank read from a HuggingFace folder (0 for a cp_dtensor checkpoint).
        """
        t0 = time.perf_counter()
        parts = self.parallel_model.model_parts
        read = 0
        if self.cfg.checkpoint.initial_load_in_hf:
            read = load_hf_weights(parts, path, self.model_spec.hf_adapter, self.model_args)
            what = f"HuggingFace weights from {path} ({read / 2**20:.1f} MiB read by rank {self.rank})"
        else:
            load_model_weights(path, ModelState(parts), fingerprint=self.model_fingerprint)
            what = f"model weights from checkpoint {path}"
        self.metrics.info(f"loaded {what} in {time.perf_counter() - t0:.2f}s")
        return read

    def save_hf(self) -> Path:
        """Write the current weights as a HuggingFace folder ``<checkpoint folder>/step-N-hf``.

        Every rank takes part (the shards are gathered one parameter at a time); one rank per pipeline stage
        writes that stage's tensors, rank 0 writes config.json, the index and the tokenizer files.
        """
        cfg, pd = self.cfg, self.parallel_dims
        assert self.checkpoints is not None
        path = self.checkpoints.step_dir(self.step).with_name(f"step-{self.step}-hf")
        t0 = time.perf_counter()
        dtype = getattr(torch, cfg.checkpoint.export_dtype)
        mesh = pd.world_mesh
        writer = all(mesh.get_local_rank(axis) == 0 for axis in ("dp", "cp", "tp"))
        stage = mesh.get_local_rank("pp")
        adapter = self.model_spec.hf_adapter
        weight_map, total = save_hf_weights(
            self.parallel_model.model_parts, path, adapter, self.model_args,
            writer=writer, file_stem=f"model-pp{stage}", dtype=dtype,
        )  # fmt: skip
        gathered: list[Any] = [None] * pd.world_size if dist.is_initialized() else [None]
        if dist.is_initialized():
            dist.all_gather_object(gathered, (weight_map, total))
        else:
            gathered = [(weight_map, total)]
        if self.rank == 0:
            merged = {k: v for m, _ in gathered for k, v in m.items()}
            base = read_hf_config(cfg.model.hf_assets_path) if cfg.model.hf_assets_path else None
            write_hf_config(
                path,
                adapter,
                self.model_args,
                dtype=dtype,
                base=base,
                assets_from=cfg.model.hf_assets_path or None,
            )
            write_index(path, merged, sum(t for _, t in gathered))
        if dist.is_initialized():
            dist.barrier()
        self.metrics.info(f"saved HuggingFace folder {path} in {time.perf_counter() - t0:.2f}s")
        return path

    def save_checkpoint(self) -> None:
        """Save the current state as the checkpoint of the current step."""
        assert self.checkpoints is not None
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.step, self._checkpoint_state(), fingerprint=self.model_fingerprint)
        self.metrics.info(f"saved checkpoint {path} in {time.perf_counter() - t0:.2f}s")

    def train_one_step(self) -> StepResult:
        """Run the next optimizer step and log it."""
        cfg, pd = self.cfg, self.parallel_dims
        t0 = time.perf_counter()
        ring_before = dataclasses.replace(self.ring_stats) if self.ring_stats is not None else None
        local_batch = next(self.data.loader)
        batch, layout = self._shard(local_batch)
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
                cp_work_imbalance=self._work_imbalance(local_batch, layout),
                **self._ring_metrics(ring_before),
            )
        )
        return result

    def _shard(self, local_batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], LayoutLike]:
        """This dp rank's rows of a batch as the model takes them: mask inputs, positions, CP layout, DTensors.

        The one path from loader rows to the model, for training and validation batches alike.
        """
        validate_token_ids(local_batch["tokens"], self.model_args.vocab_size)
        if not self.use_documents:
            local_batch.pop("document_ids", None)
        if self.cfg.data.reset_positions:
            # Rotary positions restart per document; "positions" stay the tokens' places (shard_batch adds them).
            local_batch["rope_positions"] = local_batch.pop("positions")
        layout = self._batch_layout(local_batch)
        batch = shard_batch(  # the loader read only this dp rank's rows
            {k: v.to(self.device) for k, v in local_batch.items()},
            self.parallel_dims.batch_mesh,
            layout=layout,
            rows="local",
        )
        return batch, layout

    def validate(self) -> float:
        """Loss per token of the validation batches, forward only (Note [Validation loss]); logs it.

        Raises:
            RuntimeError: ``validation.enable`` is false.
        """
        if self.validation is None:
            raise RuntimeError("Trainer.validate needs validation.enable = true and validation.paths")
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for k in range(self.validation.steps):
            batch, _ = self._shard(self.validation.loader.get_batch(k))
            part_sum, part_tokens = eval_step(
                self.parallel_model.model_parts,
                batch,
                loss_mesh=self.parallel_dims.loss_mesh,
                pipeline=self.parallel_model.pipeline,
            )
            loss_sum, tokens = loss_sum + part_sum, tokens + part_tokens
        loss = loss_sum / max(tokens, 1)
        self.validation_losses.append((self.step, loss))
        self.metrics.log_validation(self.step, loss, tokens, time.perf_counter() - t0)
        return loss

    def _batch_layout(self, local_batch: dict[str, torch.Tensor]) -> LayoutLike:
        """The CP layout of this batch: the configured name, or the balanced rule applied to its documents."""
        if not callable(self.cp_layout):
            return self.cp_layout
        ids = local_batch.get("document_ids")
        if ids is None:  # no document boundaries in this data: one document per row
            ids = torch.zeros_like(local_batch["tokens"])
        local_batch["document_ids"] = ids
        return self.cp_layout(ids, self.parallel_dims.cp)

    def _work_imbalance(self, local_batch: dict[str, torch.Tensor], layout: LayoutLike) -> float | None:
        """max / mean attention work over the CP ranks (visible pairs of the global layers), the largest of
        the data-parallel ranks' rows; returned on rank 0, which logs it (None elsewhere and without CP).

        Only the ranks of rank 0's dp group compute it (one per dp replica: the others hold the same rows);
        with dp > 1 one 1-element all-reduce (max) over that group brings the slowest replica's value to rank 0,
        so the log shows what the step waits for.
        """
        pd = self.parallel_dims
        if pd.cp == 1:
            return None
        mesh = pd.world_mesh
        coordinate = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate(), strict=True))
        if any(c != 0 for name, c in coordinate.items() if name != "dp"):  # not in rank 0's dp group
            return None
        mask = AttentionMask(self.model_args.causal, (-1, -1), local_batch.get("document_ids"))
        rows, seq_len = local_batch["tokens"].shape
        work = layout_work(to_sequence_layout(layout, pd.cp, batch=rows, seq_len=seq_len), mask)
        value = float(work.max() / work.float().mean())
        if pd.dp > 1:
            worst = torch.tensor([value], dtype=torch.float64, device=self.device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=mesh["dp"].get_group())
            value = float(worst)
        return value if self.rank == 0 else None

    def _ring_metrics(self, before: AttentionStats | None) -> dict[str, Any]:
        """This step's CP communication on this rank: bytes sent and time blocked waiting."""
        now = self.ring_stats
        if now is None or before is None:
            return {}
        now.settle()  # CUDA: the waits timed by events (the step already synchronized)
        sent = now.bytes_sent_forward + now.bytes_sent_backward
        return {
            "cp_bytes_sent": sent - before.bytes_sent_forward - before.bytes_sent_backward,
            "cp_comm_wait_s": now.comm_wait_seconds - before.comm_wait_seconds,
        }

    def train(self) -> list[StepResult]:
        """Resume if possible, train to ``training.steps``, checkpoint on the way; returns the step results."""
        cfg = self.cfg
        resumed = self.resume()
        if resumed is not None and resumed >= cfg.training.steps:
            self.metrics.info(
                f"checkpoint step {resumed} >= training.steps {cfg.training.steps}: nothing to train; raise "
                f"training.steps to continue"
            )
            self.metrics.close()
            return []
        if self.data.summary:
            self.metrics.info(f"data: {self.data.summary}")
        if self.validation is not None:
            val = self.validation
            self.metrics.info(
                f"validation: every {cfg.validation.freq} steps, {val.steps} batch(es) of "
                f"{val.loader.global_batch_size} x {val.seq_len} tokens from {val.loader.dataset.num_documents} "
                f"held-out documents"
            )
        results = []
        try:
            while self.step < cfg.training.steps:
                results.append(self.train_one_step())
                if len(results) == 1:
                    self._set_train_timeouts()
                if self.validation is not None and (
                    self.step % cfg.validation.freq == 0 or self.step == cfg.training.steps
                ):
                    self.validate()
                if self.checkpoints is not None and (
                    self.step % cfg.checkpoint.interval == 0 or self.step == cfg.training.steps
                ):
                    self.save_checkpoint()
            if self.checkpoints is not None and cfg.checkpoint.last_save_in_hf and results:
                self.save_hf()
        finally:
            self.metrics.close()
        return results
