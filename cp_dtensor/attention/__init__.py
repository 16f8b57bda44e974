"""Context-parallel attention: kernels, lse merge, ring schedule, transports, the ring op, simulation."""

from cp_dtensor.attention.comm import RingStats
from cp_dtensor.attention.kernels import KERNELS, AttentionKernel, select_kernel
from cp_dtensor.attention.ring import COMM_MODES, ring_attention
from cp_dtensor.attention.simulate import SimulationResult, simulate_context_parallel_attention

__all__ = [
    "COMM_MODES",
    "KERNELS",
    "AttentionKernel",
    "RingStats",
    "SimulationResult",
    "ring_attention",
    "select_kernel",
    "simulate_context_parallel_attention",
]
