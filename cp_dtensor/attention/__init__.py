"""Context-parallel attention: kernels, lse merge, transports, plans, the ring and all-gather drivers, the
strategy registry, the one CP attention call and its eager / compiled / simulated wrappers.

Importing the package registers the built-in strategies (p2p, allgather, alltoall, hybrid).

Note [Module-level state]
~~~~~~~~~~~~~~~~~~~~~~~~~
No module holds an option: settings live on :class:`CPSettings`, masks on the call. What modules do hold
are tables of code and caches of facts - each a pure function of its key, so none can change a result::

    strategy._STRATEGIES          the registry (Note [Strategy registry]): code, like torchtitan's train specs
    mask_schedule._PLANS          masked ring plans per (mask content, layout, cp, S, rank)  Note [Plan cache]
    schedule.build_ring_plan      unmasked plans: lru_cache of pure arithmetic
    alltoall._GROUP_PLANS         all-to-all group runs per (layout, cp, a2a_size, group, S)
    choice._choose                comm="auto" per shape and hardware: lru_cache of the cost model
    transport._SUBGROUPS          hybrid process subgroups: creating one is collective, so once per process
    simulate._RANK_THREADS        persistent simulation threads (cuDNN caches its graphs per thread)
    stats._LIVE                   AttentionStats by handle, weakly (Note [Stats handles])
    layout._DIGESTS, _LAYOUTS     content-checked digests and layouts (Notes [Digest memo], [Layout memo])
    balance._rule                 one BalancedLayoutRule per mask for compiled calls (Note [Rule memo])

Bounded where keys come from data (plans, layouts); keyed by content, never by identity alone.
"""

from cp_dtensor.attention import strategies as _strategies  # noqa: F401  (registers the built-ins)
from cp_dtensor.attention.api import attend, ring_attention
from cp_dtensor.attention.call import CPAttentionCall, build_call
from cp_dtensor.attention.kernels import KERNELS, AttentionKernel, select_kernel
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.simulate import SimulationResult, simulate_context_parallel_attention
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.strategy import Algorithm, Strategy, get_strategy, register_strategy, strategy_names

__all__ = [
    "KERNELS",
    "Algorithm",
    "AttentionKernel",
    "AttentionStats",
    "CPAttentionCall",
    "CPSettings",
    "SimulationResult",
    "Strategy",
    "attend",
    "build_call",
    "get_strategy",
    "register_strategy",
    "ring_attention",
    "select_kernel",
    "simulate_context_parallel_attention",
    "strategy_names",
]
