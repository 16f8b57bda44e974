"""An analytic cost model that recommends parallel degrees (tp, cp, pp, dp) and activation checkpointing.

The model prices one training step of a decoder on ``n_gpus`` devices for every valid
:class:`ParallelPlan`, keeps the plans whose memory fits, and ranks them by throughput. It is a planning
aid for ``scripts/plan.py`` and ``scripts/bench_train.py``; training imports it only to resolve ``comm="auto"``. One module per job:

* ``shapes``: :class:`ModelShape`, the seed's :data:`GPT_175B`, the Llama flavors (:func:`build_model_shape`).
* ``hardware``: :class:`Hardware` and :data:`HARDWARE_PRESETS` (:func:`build_hardware`).
* ``options``: :class:`CostOptions`, the implementation choices (Megatron on GPUs, or this project).
* ``parallel_plan``: :class:`ParallelPlan`, :func:`plan_problem` (can it run?) and the pipeline split
  (Note [Uneven pipeline stages]).
* ``formulas``: FLOPs, bytes, bubble and collective times of one layer (Note [Cost model]).
* ``step_estimate``: :class:`Estimate` and :func:`estimate`, one plan's step (Note [Cost model]).
* ``cp_strategy``: the CP communication strategy of one attention layer (p2p, allgather, alltoall,
  hybrid; Note [CP strategy cost]), :func:`choose_strategy`; ``comm="auto"`` of the op and the trainer
  import this module (and only it, on demand).
* ``recommendation``: :func:`enumerate_plans`, :func:`recommend` and :class:`Recommendation`.
* ``calibration``: predicted vs measured, calibrated presets (Note [Calibration file]).
* ``measure``: measure this machine into a calibrated preset (Note [Machine calibration]); imported on
  demand (``from cp_dtensor.tools.planner.measure import calibrate_machine``), it spawns processes.
"""

from cp_dtensor.cost.hardware import GIB, HARDWARE_PRESETS, Hardware, build_hardware
from cp_dtensor.tools.planner.calibration import (
    Calibration,
    Comparison,
    Measurement,
    compare_measurements,
    load_calibration,
    load_hardware,
)
from cp_dtensor.tools.planner.cp_strategy import (
    AttentionProblem,
    StrategyEstimate,
    choose_strategy,
    format_ms,
    model_attention_problem,
    strategy_estimates,
)
from cp_dtensor.tools.planner.formulas import (
    activation_bytes_per_token_layer,
    attention_flops,
    cp_comm_bytes,
    model_flops_per_token,
    pp_bubble_fraction,
)
from cp_dtensor.tools.planner.options import CostOptions
from cp_dtensor.tools.planner.parallel_plan import ParallelPlan, plan_problem
from cp_dtensor.tools.planner.recommendation import Recommendation, enumerate_plans, recommend
from cp_dtensor.tools.planner.shapes import GPT_175B, ModelShape, build_model_shape
from cp_dtensor.tools.planner.step_estimate import Estimate, estimate

__all__ = [
    "GIB",
    "GPT_175B",
    "HARDWARE_PRESETS",
    "AttentionProblem",
    "Calibration",
    "Comparison",
    "CostOptions",
    "Estimate",
    "Hardware",
    "Measurement",
    "ModelShape",
    "ParallelPlan",
    "Recommendation",
    "StrategyEstimate",
    "activation_bytes_per_token_layer",
    "attention_flops",
    "build_hardware",
    "build_model_shape",
    "choose_strategy",
    "compare_measurements",
    "cp_comm_bytes",
    "enumerate_plans",
    "estimate",
    "format_ms",
    "load_calibration",
    "load_hardware",
    "model_attention_problem",
    "model_flops_per_token",
    "plan_problem",
    "pp_bubble_fraction",
    "recommend",
    "strategy_estimates",
]
