"""What the cost model prices: a :class:`ParallelPlan` (degrees and activation checkpointing), if it can run.

:func:`plan_problem` says why a plan cannot run a model; it asks the training code's own rules
(``cp_dtensor.parallel_dims.seq_len_problem`` for the sequence divisor,
``cp_dtensor.pipeline.stages_per_rank`` for the pipeline stages) instead of restating them.
:func:`split_stages` describes the busiest pipeline rank the estimate prices (Note [Uneven pipeline stages]).

Note [Uneven pipeline stages]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``cp_dtensor.pipeline`` splits ``L`` blocks into ``n = pp * stages_per_rank(schedule)`` stages; the first
``L % n`` stages get one extra block, and any ``n <= L`` works. Rank ``r`` holds stages ``r, r + pp, ...``.
10 blocks, pp 4, 1F1B (one stage per rank)::

    stage:   0          1          2       3
    blocks:  [0 1 2]    [3 4 5]    [6 7]   [8 9] + head
    priced:  [x x x]    ...                [x x x] + head    ceil(10/4) = 3 blocks per stage

The estimate prices every stage as the largest one, ``ceil(L / n)`` blocks, and the busiest rank as
``stages_per_rank`` such stages, with the output head on top (the slowest stage: exact when ``n`` divides
``L``; otherwise an upper bound, since the stage with the head may hold one block fewer). Selective
checkpointing (every N-th block of each stage module, as ``cp_dtensor.parallelize.apply_ac``) recomputes
``ceil(ceil(L / n) / N)`` blocks per stage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from cp_dtensor.parallel_dims import seq_len_problem
from cp_dtensor.pipeline import stages_per_rank
from cp_dtensor.tools.planner.shapes import ModelShape

__all__ = ["AC_MODES", "ParallelPlan", "StageSplit", "plan_problem", "split_stages"]

AC_MODES: tuple[str, ...] = ("none", "selective", "full")


@dataclass(frozen=True)
class ParallelPlan:
    """One candidate: degrees (world size = tp * cp * pp * dp) and activation checkpointing.

    Not to be confused with ``cp_dtensor.layout`` (how a sequence is cut into CP shards).

    Attributes:
        tp: Tensor (and sequence) parallel degree.
        cp: Context parallel degree.
        pp: Pipeline-parallel ranks.
        dp: Data parallel replicas (FSDP shards over dp x cp).
        ac: ``"none"``, ``"selective"`` (every ``selective_every``-th block) or ``"full"``.
        selective_every: With ``"selective"``, recompute every N-th block.
    """

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    ac: str = "none"
    selective_every: int = 2

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp", "dp", "selective_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelPlan.{name} must be an int >= 1, got {value!r}")
        if self.ac not in AC_MODES:
            raise ValueError(f"ParallelPlan.ac must be one of {AC_MODES}, got {self.ac!r}")

    @property
    def world_size(self) -> int:
        """``tp * cp * pp * dp``."""
        return self.tp * self.cp * self.pp * self.dp

    @property
    def ac_label(self) -> str:
        """``none``, ``full`` or ``sel/N``."""
        return f"sel/{self.selective_every}" if self.ac == "selective" else self.ac

    @property
    def label(self) -> str:
        """Compact label, e.g. ``TP8 CP2 PP1 DP4 none``."""
        return f"TP{self.tp} CP{self.cp} PP{self.pp} DP{self.dp} {self.ac_label}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form (as in Note [Calibration file])."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], world_size: int | None = None) -> ParallelPlan:
        """From ``{"tp": .., "cp": .., "pp": .., "dp": .., "ac": ..}``; a missing dp is inferred.

        Args:
            data: Degrees, AC mode and ``selective_every``; missing degrees are 1.
            world_size: Infer dp from it when ``data`` has none.

        Returns:
            The plan.
        """
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"Unknown parallel plan keys {unknown}; expected tp, cp, pp, dp, ac, selective_every"
            )
        kw = {k: data[k] for k in data}
        if "dp" not in kw and world_size is not None:
            kw["dp"] = _infer_dp(world_size, kw.get("tp", 1), kw.get("cp", 1), kw.get("pp", 1))
        return cls(**kw)

    @classmethod
    def parse(cls, text: str, world_size: int | None = None) -> ParallelPlan:
        """Parse ``"tp4+full"``, ``"tp2cp2"``, ``"cp4"``, ``"tp8cp2pp2dp2+selective/4"``.

        Args:
            text: Degrees, then an optional ``+`` AC mode (``none``, ``full``, ``selective`` or ``sel``,
                optionally ``/N``).
            world_size: Infer dp from it when ``text`` has none (else dp is 1).

        Returns:
            The plan; missing degrees are 1.
        """
        m = re.fullmatch(
            r"((?:(?:tp|cp|pp|dp)\d+)+)(?:\+(none|full|selective|sel)(?:/(\d+))?)?", text.lower()
        )
        if m is None:
            raise ValueError(
                f"Cannot parse parallel plan {text!r}; write degrees then an optional AC mode, e.g. "
                f"'tp4+full', 'tp2cp2', 'tp8cp2pp2dp2+selective/4'"
            )
        degrees = {k: int(v) for k, v in re.findall(r"(tp|cp|pp|dp)(\d+)", m.group(1))}
        ac = {"sel": "selective"}.get(m.group(2) or "none", m.group(2) or "none")
        every = int(m.group(3)) if m.group(3) else 2
        if "dp" not in degrees:
            degrees["dp"] = (
                _infer_dp(world_size, degrees.get("tp", 1), degrees.get("cp", 1), degrees.get("pp", 1))
                if world_size is not None
                else 1
            )
        return cls(**degrees, ac=ac, selective_every=every)


def _infer_dp(world_size: int, tp: int, cp: int, pp: int) -> int:
    others = tp * cp * pp
    if world_size % others:
        raise ValueError(f"world size {world_size} is not divisible by tp * cp * pp = {others}")
    return world_size // others


@dataclass(frozen=True)
class StageSplit:
    """The busiest pipeline rank as the estimate prices it (Note [Uneven pipeline stages]).

    Attributes:
        stages: Pipeline stages in all (``pp * stages_per_rank``; 1 without a pipeline).
        stages_per_rank: Stages each pp rank holds.
        stage_layers: Blocks of the largest stage, ``ceil(n_layers / stages)``.
    """

    stages: int
    stages_per_rank: int
    stage_layers: int

    @property
    def rank_layers(self) -> int:
        """Blocks priced on the busiest rank: ``stages_per_rank * stage_layers``."""
        return self.stages_per_rank * self.stage_layers

    def recomputed_layers(self, plan: ParallelPlan) -> int:
        """Blocks the busiest rank recomputes in backward under ``plan.ac``."""
        if plan.ac == "full":
            return self.rank_layers
        if plan.ac == "selective":
            return self.stages_per_rank * math.ceil(self.stage_layers / plan.selective_every)
        return 0


def split_stages(n_layers: int, pp: int, pp_schedule: str = "1F1B") -> StageSplit:
    """How ``n_layers`` blocks are split over ``pp`` ranks under ``pp_schedule``, priced per busiest rank.

    Args:
        n_layers: Transformer blocks.
        pp: Pipeline-parallel degree (1: no pipeline, whatever the schedule).
        pp_schedule: Schedule name; its stages per rank come from ``cp_dtensor.pipeline.stages_per_rank``.

    Returns:
        The split (callers check ``stages <= n_layers`` first, see :func:`plan_problem`).
    """
    per_rank = stages_per_rank(pp_schedule) if pp > 1 else 1
    stages = pp * per_rank
    return StageSplit(stages=stages, stages_per_rank=per_rank, stage_layers=math.ceil(n_layers / stages))


def plan_problem(
    model: ModelShape,
    plan: ParallelPlan,
    seq_len: int,
    *,
    cp_layout: str = "zigzag",
    pp_schedule: str = "1F1B",
) -> str | None:
    """Why ``plan`` cannot run ``model`` at ``seq_len``, or None when it can.

    Rules (as ``cp_dtensor.parallelize``, ``ParallelDims`` and ``cp_dtensor.pipeline`` enforce them): tp
    divides the query and KV heads, the model dim and the FFN; ``seq_len`` passes
    ``cp_dtensor.parallel_dims.seq_len_problem``; the pipeline has at most one stage per block (uneven
    splits are fine, Note [Uneven pipeline stages]); ``selective_every`` is at most the largest stage.

    Args:
        model: Model shape.
        plan: Degrees and activation checkpointing.
        seq_len: Global sequence length.
        cp_layout: Sequence layout of the CP shards (``"zigzag"`` or ``"contiguous"``).
        pp_schedule: Pipeline schedule name.

    Returns:
        A message naming the value and the rule, or None.
    """
    t, c, p = plan.tp, plan.cp, plan.pp
    if model.n_heads % t or model.n_kv_heads % t:
        return f"tp {t} must divide n_heads {model.n_heads} and n_kv_heads {model.n_kv_heads}"
    if model.ffn_hidden % t or model.dim % t:
        return f"tp {t} must divide dim {model.dim} and ffn_hidden {model.ffn_hidden}"
    seq_problem = seq_len_problem(seq_len, cp=c, tp=t, layout=cp_layout)
    if seq_problem is not None:
        return seq_problem
    split = split_stages(model.n_layers, p, pp_schedule)
    if split.stages > model.n_layers:
        return (
            f"pp {p} x {split.stages_per_rank} stage(s) per rank ({pp_schedule}) = {split.stages} pipeline "
            f"stages exceeds n_layers {model.n_layers}; use pp x stages per rank <= {model.n_layers}"
        )
    if plan.ac == "selective" and plan.selective_every > split.stage_layers:
        return f"selective_every {plan.selective_every} exceeds layers per stage {split.stage_layers}"
    return None
