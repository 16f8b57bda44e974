"""Context-parallel attention: kernels, lse merge, transports, plans, the ring and all-gather drivers, the
strategy registry, the one CP attention call and its eager / compiled / simulated wrappers.

Importing the package registers the built-in strategies (p2p, allgather, alltoall, hybrid).
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
