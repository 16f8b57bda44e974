"""Timing one call (wall and CPU seconds) and order statistics of repeated timings."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Summary", "summarize", "time_call"]


@dataclass
class Summary:
    """Order statistics of a list of timings (seconds)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int
    values: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, min, max and quartiles (inclusive method) of ``values``; NaNs for an empty list."""
    vals = [float(v) for v in values]
    if not vals:
        nan = float("nan")
        return Summary(nan, nan, nan, nan, nan, 0, [])
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return Summary(statistics.median(vals), min(vals), max(vals), q1, q3, len(vals), vals)


def time_call(fn: Callable[[], Any]) -> tuple[float, float]:
    """Run ``fn()``; return (wall seconds, this process's CPU seconds, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0
