"""The cost model's leaf: hardware descriptions, the price of each CP strategy, activation memory.

Imports nothing of cp_dtensor outside this package, so the attention op (``comm="auto"``), the trainer
(the activation-memory check) and the planner tools all import it without cycles:

* ``hardware``: :class:`Hardware`, the presets (H100, H200, A100, CPU), calibration files.
* ``attention``: :class:`AttentionProblem` and the price of p2p, all-gather and all-to-all / hybrid
  (Note [CP strategy cost]).
* ``memory``: bytes of activations per token and per rank (Note [Activation memory]).
"""

from cp_dtensor.cost.attention import (
    AttentionProblem,
    StrategyEstimate,
    format_ms,
    price_allgather,
    price_group_all_to_all,
    price_ring,
)
from cp_dtensor.cost.hardware import GIB, HARDWARE_PRESETS, Hardware, build_hardware, load_hardware_spec
from cp_dtensor.cost.memory import (
    BlockShape,
    MemoryFormat,
    activation_bytes_per_rank,
    block_activation_bytes_per_token,
    head_activation_bytes_per_token,
    recomputed_layers,
)

__all__ = [
    "GIB",
    "HARDWARE_PRESETS",
    "AttentionProblem",
    "BlockShape",
    "Hardware",
    "MemoryFormat",
    "StrategyEstimate",
    "activation_bytes_per_rank",
    "block_activation_bytes_per_token",
    "build_hardware",
    "format_ms",
    "head_activation_bytes_per_token",
    "load_hardware_spec",
    "price_allgather",
    "price_group_all_to_all",
    "price_ring",
    "recomputed_layers",
]
