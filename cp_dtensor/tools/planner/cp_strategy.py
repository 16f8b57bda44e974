"""The CP strategy of one attention layer of a model, for the planner: the library's cost model applied to
a :class:`~.shapes.ModelShape`.

The strategies, their validity rules and prices live in the library (``cp_dtensor.attention.strategies``,
``cp_dtensor.cost.attention``, Note [CP strategy cost]); ``comm="auto"`` of the op and the trainer use the same
functions. This module only turns a model into an :class:`AttentionProblem` and re-exports the choice.
"""

from __future__ import annotations

from cp_dtensor.attention.choice import TIE, choose_strategy, strategy_estimates
from cp_dtensor.cost.attention import AttentionProblem, StrategyEstimate, format_ms
from cp_dtensor.tools.planner.formulas import kv_heads_per_rank
from cp_dtensor.tools.planner.shapes import ModelShape

__all__ = [
    "TIE",
    "AttentionProblem",
    "StrategyEstimate",
    "choose_strategy",
    "format_ms",
    "model_attention_problem",
    "strategy_estimates",
]


def model_attention_problem(
    model: ModelShape, seq_len: int, cp: int, tp: int = 1, *, micro_batch: int = 1, dtype_bytes: int = 2
) -> AttentionProblem:
    """The :class:`AttentionProblem` of one of ``model``'s attention layers under ``tp`` x ``cp``
    (KV heads replicated when fewer than tp, as :func:`~.formulas.kv_heads_per_rank`)."""
    return AttentionProblem(
        heads=model.n_heads // tp, kv_heads=kv_heads_per_rank(model, tp), head_dim=model.head_dim,
        seq_len=seq_len, cp=cp, tp=tp, micro_batch=micro_batch, dtype_bytes=dtype_bytes,
        grad_bytes=max(4, dtype_bytes), causal=model.causal,
    )  # fmt: skip
