"""One training step on a parallelized model: global-token-mean loss, backward, clipping, optimizer.

Note [Global token mean]
~~~~~~~~~~~~~~~~~~~~~~~~
Each rank sees a (dp, cp) slice of the global batch: rows over dp, sequence shards over cp. The loss is

    loss = sum over every rank's valid tokens of CE  /  number of valid tokens in the global batch

so each rank computes ``sum(CE of its tokens) / N_global`` (N_global: one all-reduce of the local counts
over dp x cp) and FSDP *sums* gradients over dp x cp. The result is independent of the layout, of how
many ignored (-100) labels each shard has, and of the microbatch split under PP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from cp_dtensor.sharding import batch_rows

__all__ = [
    "IGNORE_INDEX",
    "PipelineState",
    "StepResult",
    "TokenMeanLoss",
    "clip_grad_norm_",
    "count_global_tokens",
    "eval_step",
    "token_loss_sum",
    "train_step",
]

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross entropy of (B, S, V) logits against (B, S) labels, ignoring ``IGNORE_INDEX``."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_global_tokens(labels: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Number of valid labels over the whole global batch (all-reduce over ``mesh``, e.g. dp x cp)."""
    count = (labels != IGNORE_INDEX).sum().to(torch.float64)
    if mesh is not None and mesh.size() > 1:
        dist.all_reduce(count, group=mesh.get_group())
    return count


def _replication(p: torch.Tensor) -> int:
    """How many ranks of the tensor's mesh hold the same local values (Replicate placements)."""
    if not isinstance(p, DTensor):
        return 1
    mesh = p.device_mesh
    return math.prod(mesh.size(i) for i, pl in enumerate(p.placements) if pl.is_replicate())


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients by their global 2-norm across every mesh (TP, FSDP and pipeline stages).

    Each rank sums the squares of its local gradient shards, divided by how many ranks hold the same
    replicated values; one all-reduce over all ranks then gives the squared norm of the whole model
    (pipeline stages hold disjoint parameters, so they simply add up).

    Returns:
        The total norm before clipping (a plain fp32 scalar tensor, identical on every rank).
    """
    params = [p for p in parameters if p.grad is not None]
    local_grads = [_local(p.grad) for p in params]
    # On the gradients' device: NCCL reduces only device tensors.
    device = local_grads[0].device if local_grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for p, local in zip(params, local_grads):
        total_sq += local.detach().double().pow(2).sum() / _replication(p.grad)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_sq)
    total = total_sq.sqrt().to(torch.float32)
    if max_norm > 0 and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total


class TokenMeanLoss:
    """``loss_fn(output, target)`` for pipeline schedules: summed CE divided by ``normalizer``.

    :func:`train_step` sets ``normalizer`` to the global valid-token count before each step.
    """

    def __init__(self) -> None:
        self.normalizer: torch.Tensor | float = 1.0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one microbatch, already normalized for the whole global batch."""
        return token_loss_sum(output, target) / self.normalizer


@dataclass
class PipelineState:
    """What :func:`train_step` needs to drive a pipeline schedule on this rank."""

    schedule: object
    loss_fn: TokenMeanLoss
    mesh: DeviceMesh
    has_first_stage: bool
    has_last_stage: bool


@dataclass
class StepResult:
    """What one step reports: global mean loss, gradient norm before clipping, global valid tokens, and
    whether the update was skipped (non-finite values with ``on_nonfinite="skip"``)."""

    loss: float
    grad_norm: float
    tokens: int
    skipped: bool = False


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


def _layout_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"layout_positions": ...}`` when the batch carries its layout (Note [Travelling layout]), else {}."""
    layout = batch.get("layout_positions")
    return {} if layout is None else {"layout_positions": layout}


def _extra_inputs(
    document_ids: torch.Tensor | None,
    rope_positions: torch.Tensor | None,
    travelling: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The optional model inputs a pipeline schedule splits per microbatch, as local tensors."""
    named = {"document_ids": document_ids, "rope_positions": rope_positions, **travelling}
    return {name: _local(t) for name, t in named.items() if t is not None}


def _forward_backward(
    model_parts: list[nn.Module],
    batch: dict[str, torch.Tensor],
    n_global: torch.Tensor,
    pipeline: PipelineState | None,
) -> torch.Tensor:
    """Forward and backward of one (micro)batch; returns this rank's share of the global mean loss.

    The model takes the batch as it comes (CP DTensors from ``shard_batch``: its CP styles turn them into
    local shards); the loss is computed on the local shards.
    """
    tokens, labels, positions = (batch[k] for k in ("tokens", "labels", "positions"))
    document_ids = batch.get("document_ids")  # (B, S) whole sequences: the attention mask of packed data
    rope_positions = batch.get("rope_positions")  # per-document rotary positions (data.reset_positions)
    travelling = _layout_kwargs(batch)  # Note [Travelling layout]
    labels = _local(labels)
    if pipeline is None:
        (model,) = model_parts
        logits = _local(
            model(tokens, positions, document_ids, rope_positions, **travelling)
        )  # (B, S_local, V)
        loss = token_loss_sum(logits, labels) / n_global
        loss.backward()
        return loss.detach()
    # torch.distributed.pipelining splits and sends plain tensors: stages get local shards.
    tokens, positions = _local(tokens), _local(positions)
    extra = _extra_inputs(document_ids, rope_positions, travelling)
    pipeline.loss_fn.normalizer = n_global
    losses: list[torch.Tensor] = []
    args = (tokens,) if pipeline.has_first_stage else ()
    target = labels if pipeline.has_last_stage else None
    pipeline.schedule.step(*args, positions=positions, target=target, losses=losses, **extra)
    return (
        torch.stack(losses).sum().detach()
        if pipeline.has_last_stage
        else torch.zeros((), device=labels.device)
    )


def train_step(
    model_parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer],
    batch: dict[str, torch.Tensor],
    *,
    loss_mesh: DeviceMesh | None,
    pipeline: PipelineState | None = None,
    max_norm: float = 1.0,
    accumulation_steps: int = 1,
    on_nonfinite: str = "raise",
) -> StepResult:
    """Forward, backward (with gradient accumulation), clip and update once (Note [Global token mean]).

    Args:
        model_parts: the model, or this pp rank's stage modules.
        optimizers: the optimizers over the parts' parameters (one per part, or one for all).
        batch: this rank's ``tokens``, ``labels``, ``positions`` as CP DTensors from
            :func:`cp_dtensor.shard_batch` (or local tensors), local shape (B_local, S_local); split into
            ``accumulation_steps`` row chunks.
        loss_mesh: the dp x cp mesh the token count and loss are reduced over (None: single process).
        pipeline: the pipeline schedule and this rank's stage roles (pp > 1), else None.
        max_norm: gradient clipping threshold; 0 disables clipping (the norm is still reported).
        accumulation_steps: forward/backward passes per optimizer step.
        on_nonfinite: for a NaN/Inf loss or gradient norm (the same on every rank, both are reduced):
            ``"raise"`` a ``FloatingPointError``, ``"skip"`` the update, or ``"ignore"``.

    Returns:
        The global mean loss, the gradient norm before clipping and the global token count. A global batch
        without a single counted label (loss-masked data whose completions all fell outside it) is skipped:
        no forward, no update, ``skipped`` set and ``tokens`` 0.
    """
    keys = ("tokens", "labels", "positions", "document_ids", "rope_positions", "layout_positions")
    batch = {k: batch[k] for k in keys if k in batch}
    rows = _local(batch["tokens"]).shape[0]
    if rows % accumulation_steps:
        raise ValueError(f"{rows} local rows cannot be split into {accumulation_steps} accumulation steps.")
    n_global = count_global_tokens(_local(batch["labels"]), loss_mesh)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if int(n_global.item()) == 0:  # the same on every rank: nothing to learn from, no update (not a NaN)
        return StepResult(loss=0.0, grad_norm=0.0, tokens=0, skipped=True)
    local_loss = torch.zeros((), dtype=torch.float64, device=n_global.device)
    per = rows // accumulation_steps
    for chunk in range(accumulation_steps):
        micro = batch_rows(batch, chunk * per, (chunk + 1) * per)
        local_loss += _forward_backward(model_parts, micro, n_global, pipeline).to(torch.float64)
    if loss_mesh is not None and loss_mesh.size() > 1:
        dist.all_reduce(local_loss, group=loss_mesh.get_group())
    pp_mesh = pipeline.mesh if pipeline is not None else None
    if pp_mesh is not None and pp_mesh.size() > 1:
        dist.all_reduce(local_loss, group=pp_mesh.get_group())  # only the last stage contributes
    params = [p for m in model_parts for p in m.parameters()]
    grad_norm = clip_grad_norm_(params, max_norm)
    result = StepResult(loss=local_loss.item(), grad_norm=grad_norm.item(), tokens=int(n_global.item()))
    if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
        if on_nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss {result.loss} or gradient norm {result.grad_norm}; the update was not applied"
            )
        if on_nonfinite == "skip":
            result.skipped = True
            return result
    for opt in optimizers:
        opt.step()
    return result


@torch.no_grad()
def eval_step(
    model_parts: list[nn.Module],
    batch: dict[str, torch.Tensor],
    *,
    loss_mesh: DeviceMesh | None,
    pipeline: PipelineState | None = None,
) -> tuple[float, int]:
    """Forward only: the summed cross entropy and the valid-token count of one batch, over all ranks.

    The batch goes through the model exactly as in :func:`train_step` (CP DTensors from ``shard_batch``,
    pipeline schedules with ``schedule.eval``), without gradients; ``loss_sum / tokens`` summed over batches
    is the loss per token (Note [Global token mean]).

    Args:
        model_parts: the model, or this pp rank's stage modules.
        batch: this rank's ``tokens``, ``labels``, ``positions`` (+ ``document_ids``, ``rope_positions``).
        loss_mesh: the dp x cp mesh the sums are reduced over (None: single process).
        pipeline: the pipeline schedule and this rank's stage roles (pp > 1), else None.

    Returns:
        ``(loss_sum, tokens)``: identical on every rank.
    """
    tokens, labels, positions = (batch[k] for k in ("tokens", "labels", "positions"))
    document_ids, rope_positions = batch.get("document_ids"), batch.get("rope_positions")
    travelling = _layout_kwargs(batch)
    labels = _local(labels)
    n_global = count_global_tokens(labels, loss_mesh)
    if pipeline is None:
        (model,) = model_parts
        logits = _local(
            model(tokens, positions, document_ids, rope_positions, **travelling)
        )  # (B, S_local, V)
        loss_sum = token_loss_sum(logits, labels).to(torch.float64)
    else:
        extra = _extra_inputs(document_ids, rope_positions, travelling)
        pipeline.loss_fn.normalizer = 1.0  # sums; train_step sets its own normalizer every step
        losses: list[torch.Tensor] = []
        args = (_local(tokens),) if pipeline.has_first_stage else ()
        target = labels if pipeline.has_last_stage else None
        pipeline.schedule.eval(*args, positions=_local(positions), target=target, losses=losses, **extra)
        loss_sum = (
            torch.stack(losses).sum().to(torch.float64)
            if pipeline.has_last_stage
            else torch.zeros((), dtype=torch.float64, device=labels.device)
        )
    if loss_mesh is not None and loss_mesh.size() > 1:
        dist.all_reduce(loss_sum, group=loss_mesh.get_group())
    if pipeline is not None and pipeline.mesh.size() > 1:
        dist.all_reduce(loss_sum, group=pipeline.mesh.get_group())  # only the last stage contributes
    return loss_sum.item(), int(n_global.item())
