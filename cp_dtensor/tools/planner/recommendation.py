"""Enumerate every :class:`~.parallel_plan.ParallelPlan` of a world size, price each, rank those that fit.

:func:`recommend` is the planner's answer: the fastest plan whose memory fits, against a baseline (the
seed's TP8 CP1 with full recompute). For ``"selective"`` checkpointing it picks the sparsest recomputation
that fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from cp_dtensor.cost.hardware import Hardware
from cp_dtensor.tools.planner.options import CostOptions
from cp_dtensor.tools.planner.parallel_plan import AC_MODES, ParallelPlan, plan_problem, split_stages
from cp_dtensor.tools.planner.shapes import ModelShape
from cp_dtensor.tools.planner.step_estimate import Estimate, estimate

__all__ = ["SELECTIVE_EVERY_CHOICES", "Recommendation", "enumerate_plans", "microbatches_for", "recommend"]

SELECTIVE_EVERY_CHOICES: tuple[int, ...] = (8, 6, 4, 3, 2)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_plans(
    model: ModelShape,
    seq_len: int,
    n_gpus: int,
    hardware: Hardware,
    *,
    cp_layout: str = "zigzag",
    pp_schedule: str = "1F1B",
    allow_cross_node_tp: bool = False,
    ac_modes: Sequence[str] = AC_MODES,
    max_pp: int | None = None,
) -> list[ParallelPlan]:
    """All valid ``(tp, cp, pp, dp, ac)`` with ``tp * cp * pp * dp == n_gpus``.

    Args:
        model: Model shape.
        seq_len: Global sequence length.
        n_gpus: World size.
        hardware: Only its ``devices_per_node`` is used (tp stays within a node unless allowed).
        cp_layout: Sequence layout of CP shards (sets the sequence divisor).
        pp_schedule: Pipeline schedule (sets the stages per pp rank).
        allow_cross_node_tp: Also propose tp larger than a node.
        ac_modes: Activation checkpointing modes to propose.
        max_pp: Largest pipeline degree to propose (default: no limit).

    Returns:
        Plans in a deterministic order; ``"selective"`` ones carry ``selective_every = 2``
        (:func:`recommend` picks the sparsest recomputation that fits).
    """
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    out: list[ParallelPlan] = []
    for tp in _divisors(n_gpus):
        if tp > hardware.devices_per_node and not allow_cross_node_tp:
            continue
        for cp in _divisors(n_gpus // tp):
            for pp in _divisors(n_gpus // (tp * cp)):
                if max_pp is not None and pp > max_pp:
                    continue
                dp = n_gpus // (tp * cp * pp)
                for ac in ac_modes:
                    plan = ParallelPlan(tp=tp, cp=cp, pp=pp, dp=dp, ac=ac)
                    if (
                        plan_problem(model, plan, seq_len, cp_layout=cp_layout, pp_schedule=pp_schedule)
                        is None
                    ):
                        out.append(plan)
    return out


@dataclass
class Recommendation:
    """Result of :func:`recommend`.

    Attributes:
        model: Model shape.
        seq_len: Global sequence length.
        n_gpus: World size.
        hardware: Device description.
        options: Implementation choices.
        rows: Plans that fit, best first (highest tokens/s).
        rejected: Plans that do not fit (or cannot run), with ``reason``.
        baseline: The baseline plan's estimate (the seed's TP8 CP1 full recompute), fitting or not;
            None when it cannot be formed on ``n_gpus``.
    """

    model: ModelShape
    seq_len: int
    n_gpus: int
    hardware: Hardware
    options: CostOptions
    rows: list[Estimate] = field(default_factory=list)
    rejected: list[Estimate] = field(default_factory=list)
    baseline: Estimate | None = None

    @property
    def best(self) -> Estimate | None:
        """The recommended plan (fastest that fits), or None when nothing fits."""
        return self.rows[0] if self.rows else None

    def speedup(self, row: Estimate) -> float | None:
        """``row.tokens_per_s / baseline.tokens_per_s`` (None without a baseline)."""
        if self.baseline is None or self.baseline.tokens_per_s <= 0:
            return None
        return row.tokens_per_s / self.baseline.tokens_per_s


def microbatches_for(global_batch_tokens: int, seq_len: int, dp: int, micro_batch: int) -> int:
    """Micro-batches per DP replica to process ``global_batch_tokens`` (at least one sequence per replica)."""
    sequences = max(1, global_batch_tokens // seq_len)
    return max(1, math.ceil(sequences / (dp * micro_batch)))


def _estimate_in_batch(
    model: ModelShape,
    plan: ParallelPlan,
    seq_len: int,
    hardware: Hardware,
    options: CostOptions,
    micro_batch: int,
    global_batch_tokens: int | None,
    microbatches: int,
) -> Estimate:
    """:func:`estimate` with the global batch's micro-batches; selective: the sparsest N that fits."""
    m = microbatches
    if global_batch_tokens is not None:
        sequences = max(1, global_batch_tokens // seq_len)
        if plan.dp * micro_batch > sequences:
            est = Estimate(plan=plan, seq_len=seq_len, micro_batch=micro_batch, microbatches=1)
            est.reason = (
                f"dp {plan.dp} x micro_batch {micro_batch} exceeds the {sequences} sequences of the "
                f"global batch ({global_batch_tokens} tokens)"
            )
            return est
        m = microbatches_for(global_batch_tokens, seq_len, plan.dp, micro_batch)
    if plan.ac != "selective":
        return estimate(model, plan, seq_len, hardware, options, micro_batch=micro_batch, microbatches=m)
    # selective: the sparsest recomputation (largest N) that fits; N = 2 if none does
    stage_layers = split_stages(model.n_layers, plan.pp, options.pp_schedule).stage_layers
    choices = [n for n in SELECTIVE_EVERY_CHOICES if 2 <= n <= stage_layers] or [1]
    last: Estimate | None = None
    for n in choices:
        last = estimate(
            model,
            replace(plan, selective_every=n),
            seq_len,
            hardware,
            options,
            micro_batch=micro_batch,
            microbatches=m,
        )
        if last.fits:
            return last
    assert last is not None
    return last


def recommend(
    model: ModelShape,
    seq_len: int,
    n_gpus: int,
    hardware: Hardware,
    options: CostOptions | None = None,
    *,
    micro_batch: int = 1,
    global_batch_tokens: int | None = 4 * 2**20,
    microbatches: int = 1,
    plans: Iterable[ParallelPlan] | None = None,
    baseline: ParallelPlan | None = None,
    allow_cross_node_tp: bool = False,
    max_pp: int | None = None,
) -> Recommendation:
    """Enumerate plans, drop those that do not fit, rank the rest by throughput.

    Args:
        model: Model shape.
        seq_len: Global sequence length.
        n_gpus: World size.
        hardware: Device and links.
        options: Implementation choices (default :meth:`CostOptions.megatron`).
        micro_batch: Sequences per micro-batch.
        global_batch_tokens: Tokens per step; each plan gets ``ceil(sequences / (dp * micro_batch))``
            micro-batches per replica. None: use ``microbatches`` for every plan.
        microbatches: Micro-batches per replica when ``global_batch_tokens`` is None.
        plans: Candidates (default :func:`enumerate_plans`).
        baseline: Plan to compare against (default the seed's TP8 CP1 PP1 full recompute, dp = n_gpus / 8;
            TP = n_gpus below 8 devices). An invalid baseline leaves ``Recommendation.baseline`` None.
        allow_cross_node_tp: Propose tp larger than a node.
        max_pp: Largest pipeline degree to propose.

    Returns:
        The ranked table; ``best`` is the fastest plan that fits (never one that does not).
    """
    opt = options or CostOptions()
    candidates = (
        list(plans)
        if plans is not None
        else enumerate_plans(
            model,
            seq_len,
            n_gpus,
            hardware,
            cp_layout=opt.cp_layout,
            pp_schedule=opt.pp_schedule,
            allow_cross_node_tp=allow_cross_node_tp,
            max_pp=max_pp,
        )
    )
    rec = Recommendation(model=model, seq_len=seq_len, n_gpus=n_gpus, hardware=hardware, options=opt)
    for plan in candidates:
        if plan.world_size != n_gpus:
            raise ValueError(f"plan {plan.label} has world size {plan.world_size}, expected {n_gpus}")
        est = _estimate_in_batch(
            model, plan, seq_len, hardware, opt, micro_batch, global_batch_tokens, microbatches
        )
        (rec.rows if est.fits else rec.rejected).append(est)
    rec.rows.sort(key=lambda e: (-e.tokens_per_s, e.peak_bytes))
    rec.rejected.sort(key=lambda e: (e.reason.startswith("out of memory") is False, -e.tokens_per_s))
    base_tp = min(8, n_gpus)
    if baseline is None and n_gpus % base_tp == 0:
        baseline = ParallelPlan(tp=base_tp, cp=1, pp=1, dp=n_gpus // base_tp, ac="full")
    if baseline is not None:
        rec.baseline = _estimate_in_batch(
            model, baseline, seq_len, hardware, opt, micro_batch, global_batch_tokens, microbatches
        )
        if rec.baseline.tokens_per_s <= 0:  # invalid for this model / sequence
            rec.baseline = None
    return rec
