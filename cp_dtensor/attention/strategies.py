"""The built-in CP strategies: p2p (ring), allgather, alltoall (Ulysses) and hybrid (all-to-all x ring).

Each is one :class:`~cp_dtensor.attention.strategy.Strategy` (Note [Strategy registry]): its validity rule,
its plan on one rank, and its price (``cp_dtensor.cost.attention``). Unmasked calls on named layouts run
the arithmetic schedules (Notes [Ring schedule], [All-gather blocks]); documents, windows and layout
objects run the masked plans (Notes [Masked pieces], [Masked ring traffic]) - one driver each way.
"""

from __future__ import annotations

from cp_dtensor.attention.allgather import allgather_backward, allgather_forward, build_allgather_plan
from cp_dtensor.attention.alltoall import (
    AllToAllPlan,
    alltoall_backward,
    alltoall_forward,
    build_group_plan,
    head_split_problem,
)
from cp_dtensor.attention.kernels import AttentionKernel
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.mask_schedule import build_masked_plan
from cp_dtensor.attention.plan import RingPlan
from cp_dtensor.attention.ring import ring_backward, ring_forward
from cp_dtensor.attention.schedule import build_ring_plan
from cp_dtensor.attention.strategy import Algorithm, Strategy, register_strategy
from cp_dtensor.cost.attention import (
    AttentionProblem,
    StrategyEstimate,
    price_allgather,
    price_group_all_to_all,
    price_ring,
)
from cp_dtensor.cost.hardware import Hardware
from cp_dtensor.layout import LayoutLike

__all__ = ["AllGatherStrategy", "AllToAllStrategy", "HybridStrategy", "RingStrategy", "build_ring_plan_for"]


def build_ring_plan_for(
    layout: LayoutLike, mask: AttentionMask, rank: int, cp: int, s_local: int
) -> RingPlan:
    """The ring plan of one call: the arithmetic schedule for plain masks on named layouts, else the
    masked plan (documents, windows, layout objects)."""
    if mask.is_plain and isinstance(layout, str):
        return build_ring_plan(rank, cp, layout, bool(mask.is_causal), s_local)
    return build_masked_plan(mask, layout, cp, s_local * cp, rank)


class RingStrategy(Strategy):
    """``comm="p2p"``: the ring of point-to-point K/V transfers, overlapped with the pieces."""

    name = "p2p"
    preference = 0

    def build(self, *, layout, mask, rank, cp, s_local, a2a_size, scale, kernel) -> Algorithm:
        plan = build_ring_plan_for(layout, mask, rank, cp, s_local)
        return Algorithm(ring_forward, ring_backward, {"plan": plan, "scale": scale, "kernel": kernel})

    def estimate(
        self, problem: AttentionProblem, hardware: Hardware, a2a_size: int | None
    ) -> StrategyEstimate:
        return price_ring(problem, hardware)


class AllGatherStrategy(Strategy):
    """``comm="allgather"``: gather the K/V rows others need once (Llama 3's choice), no overlap."""

    name = "allgather"
    preference = 3

    def build(self, *, layout, mask, rank, cp, s_local, a2a_size, scale, kernel) -> Algorithm:
        if mask.is_plain and isinstance(layout, str):
            plan = build_allgather_plan(
                None, rank=rank, cp=cp, s_local=s_local, layout=layout, is_causal=bool(mask.is_causal)
            )
        else:
            ring = build_masked_plan(mask, layout, cp, s_local * cp, rank)
            plan = build_allgather_plan(ring, rank=rank, cp=cp, s_local=s_local)
        return Algorithm(
            allgather_forward, allgather_backward, {"plan": plan, "scale": scale, "kernel": kernel}
        )

    def estimate(
        self, problem: AttentionProblem, hardware: Hardware, a2a_size: int | None
    ) -> StrategyEstimate:
        return price_allgather(problem, hardware)


def _group_algorithm(
    layout: LayoutLike,
    mask: AttentionMask,
    rank: int,
    cp: int,
    s_local: int,
    size: int,
    scale: float,
    kernel: AttentionKernel,
) -> Algorithm:
    """All-to-all inside groups of ``size`` ranks around the ring of the cp / size super-shards."""
    group = build_group_plan(layout, cp, size, rank, s_local * cp)
    ring_plan = build_ring_plan_for(group.ring_layout, mask, group.index, group.n_groups, size * s_local)
    ring = Algorithm(ring_forward, ring_backward, {"plan": ring_plan, "scale": scale, "kernel": kernel})
    return Algorithm(alltoall_forward, alltoall_backward, {"plan": AllToAllPlan(group, ring)})


class AllToAllStrategy(Strategy):
    """``comm="alltoall"`` (Ulysses): heads to ranks, the whole sequence per head group, and back."""

    name = "alltoall"
    preference = 2

    def check(self, heads: int, kv_heads: int, cp: int, a2a_size: int | None) -> str | None:
        return head_split_problem(heads, kv_heads, cp, self.name, cp)

    def check_group_size(self, a2a_size: int | None, cp: int | None) -> str | None:
        if a2a_size is None or (cp is not None and a2a_size == cp):
            return None
        return super().check_group_size(a2a_size, cp)

    def group_sizes(self, cp: int) -> tuple[int | None, ...]:
        return (cp,)  # one group of every rank

    def build(self, *, layout, mask, rank, cp, s_local, a2a_size, scale, kernel) -> Algorithm:
        return _group_algorithm(layout, mask, rank, cp, s_local, cp, scale, kernel)

    def estimate(
        self, problem: AttentionProblem, hardware: Hardware, a2a_size: int | None
    ) -> StrategyEstimate:
        return price_group_all_to_all(problem, hardware, problem.cp, self.name)


class HybridStrategy(Strategy):
    """``comm="hybrid"``: all-to-all inside groups of ``a2a_size`` consecutive ranks, the ring across them."""

    name = "hybrid"
    preference = 1
    takes_group_size = True

    def check_group_size(self, a2a_size: int | None, cp: int | None) -> str | None:
        if a2a_size is None:
            return (
                f"comm='hybrid' needs a2a_size=k, the number of consecutive CP ranks that share heads by "
                f"all-to-all (cp / k groups then form rings); k must divide the CP degree"
                f"{'' if cp is None else f' {cp}'}, e.g. a2a_size=2 for CP 4 = 2 x 2."
            )
        if isinstance(a2a_size, bool) or not isinstance(a2a_size, int) or a2a_size < 1:
            return (
                f"a2a_size={a2a_size!r} must be a positive divisor of the CP degree (the ranks per all-to-all "
                f"group of comm='hybrid')."
            )
        if cp is not None and cp % a2a_size:
            return (
                f"a2a_size={a2a_size!r} must be a positive divisor of the CP degree {cp} (comm='hybrid' "
                f"splits the CP group into groups of a2a_size consecutive ranks)."
            )
        return None

    def check(self, heads: int, kv_heads: int, cp: int, a2a_size: int | None) -> str | None:
        assert a2a_size is not None
        return head_split_problem(heads, kv_heads, a2a_size, self.name, cp)

    def group_sizes(self, cp: int) -> tuple[int | None, ...]:
        return tuple(k for k in range(2, cp) if cp % k == 0)

    def build(self, *, layout, mask, rank, cp, s_local, a2a_size, scale, kernel) -> Algorithm:
        assert a2a_size is not None
        return _group_algorithm(layout, mask, rank, cp, s_local, a2a_size, scale, kernel)

    def estimate(
        self, problem: AttentionProblem, hardware: Hardware, a2a_size: int | None
    ) -> StrategyEstimate:
        assert a2a_size is not None
        return price_group_all_to_all(problem, hardware, a2a_size, self.name)


for _strategy in (RingStrategy(), AllGatherStrategy(), AllToAllStrategy(), HybridStrategy()):
    register_strategy(_strategy)
