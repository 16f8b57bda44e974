"""Evaluation of long-context models under CP: needle in a haystack (Note [Needle in a haystack])."""

from cp_dtensor.evaluation.needle import (
    NeedleSample,
    build_samples,
    cell_score,
    haystack_text,
    score,
    summary_table,
)

__all__ = ["NeedleSample", "build_samples", "cell_score", "haystack_text", "score", "summary_table"]
