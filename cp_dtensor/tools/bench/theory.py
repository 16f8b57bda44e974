"""What attention must cost: the communication minimum per rank and the visible score elements (work)."""

from __future__ import annotations

import torch

__all__ = ["min_bytes_per_rank", "score_elements", "torch_bytes_analytic"]


def min_bytes_per_rank(
    *, batch: int, kv_heads: int, seq_len: int, head_dim: int, cp: int, dtype: torch.dtype
) -> dict[str, int]:
    """Theoretical minimum of bytes one rank must send in ring attention (forward, backward).

    Forward: every rank must receive the K and V shards of the CP-1 other ranks, so each sends
    (CP-1) x (K+V shard bytes of Hkv heads). Backward: the same KV again (nothing but q, k, v, out and lse
    is saved), plus the dK/dV partial sums of the other ranks' shards must reach their owners: a
    reduce-scatter, (CP-1) x dK/dV shard bytes per rank, in the accumulation dtype (fp32; fp64 for fp64).

    Args:
        batch: batch size B.
        kv_heads: key/value heads Hkv.
        seq_len: global sequence length S.
        head_dim: head dim D.
        cp: CP degree.
        dtype: dtype of K and V.

    Returns:
        ``{"forward": ..., "backward": ..., "kv_shard": ..., "dkv_shard": ...}`` in bytes.
    """
    s_local = seq_len // cp
    elements = 2 * batch * kv_heads * s_local * head_dim  # K and V: (2, B, Hkv, S_local, D)
    acc_size = 8 if dtype == torch.float64 else 4
    kv_shard = elements * torch.tensor([], dtype=dtype).element_size()
    dkv_shard = elements * acc_size
    return {
        "forward": (cp - 1) * kv_shard,
        "backward": (cp - 1) * (kv_shard + dkv_shard),
        "kv_shard": kv_shard,
        "dkv_shard": dkv_shard,
    }


def torch_bytes_analytic(cp: int, kv_shard: int, dkv_shard: int) -> dict[str, int]:
    """Bytes per rank of PyTorch's loop from its code: KV (CP-1) times each pass, dK/dV CP times (fp32)."""
    return {"forward": (cp - 1) * kv_shard, "backward": (cp - 1) * kv_shard + cp * dkv_shard}


def score_elements(batch: int, q_heads: int, sq: int, sk: int, causal: bool) -> int:
    """Visible (query, key) score elements of one attention call (causal blocks are square)."""
    per_head = sq * (sq + 1) // 2 if causal else sq * sk
    return batch * q_heads * per_head
