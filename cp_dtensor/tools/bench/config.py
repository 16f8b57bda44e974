"""What one benchmark run measures: shapes, the sequence-length sweep, repeats, variants, dtype names."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "BenchConfig", "dtype_from_name"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (also float64, bfloat16, float16).

    Raises:
        ValueError: ``name`` is not one of :data:`DTYPES`.
    """
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
    return DTYPES[name]


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration (all sequence lengths share it).

    Attributes:
        batch: batch size B.
        heads: query heads Hq.
        kv_heads: key/value heads Hkv (Hq % Hkv == 0).
        head_dim: head dim D.
        seq_lens: global sequence lengths S of the sweep.
        cp: CP degree = number of spawned ranks.
        dtype: a key of :data:`DTYPES`.
        causal: causal mask (else bidirectional).
        repeats: timed repeats per variant.
        warmup: untimed warmup rounds before timing.
        overlap_repeats: repeats of the hidden-communication measurement (0 skips it).
        variants: names of the variants to run (see :mod:`.variants`).
        seed: seed of the random inputs (plus S).
        profile: also profile one step per CP variant.
    """

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_lens: tuple[int, ...]
    cp: int
    dtype: str
    causal: bool
    repeats: int
    warmup: int
    overlap_repeats: int
    variants: tuple[str, ...]
    seed: int
    profile: bool

    @property
    def scale(self) -> float:
        """Softmax scale 1 / sqrt(D)."""
        return 1.0 / math.sqrt(self.head_dim)
