"""Merging partial attention results by their log-sum-exp.

Note [LSE merge]
~~~~~~~~~~~~~~~~
Attention of a query row over keys split into blocks A and B::

    keys:      [ ---- A ---- | ---- B ---- ]
    partials:    (o_A, l_A)    (o_B, l_B)      o = softmax-weighted values, l = logsumexp of scores

    l   = log(e^l_A + e^l_B)        = m + log(e^(l_A - m) + e^(l_B - m)),  m = max(l_A, l_B)
    o   = o_A * e^(l_A - l) + o_B * e^(l_B - l)

Every exponent is <= 0, so nothing overflows. A row that has seen no key yet has l = -inf and o = 0; it
gets weight 0 and the other side's values, and a row with no key on either side stays (o = 0, l = -inf)
instead of becoming NaN. The accumulator is kept in fp32 (fp64 for fp64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "merge_block_"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the output/lse/gradient accumulators: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_block_(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor
) -> None:
    """Merge one block's ``(out_blk, lse_blk)`` into the accumulators, in place.

    Args:
        out_acc: (B, H, S, D) accumulator (fp32/fp64); may be a view of a larger accumulator.
        lse_acc: (B, H, S) accumulator, same dtype and rows as ``out_acc``.
        out_blk: (B, H, S, D) the block's output in any floating dtype.
        lse_blk: (B, H, S) the block's log-sum-exp.
    """
    lse_blk = lse_blk.to(lse_acc.dtype)
    m = torch.maximum(lse_acc, lse_blk)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key on either side
    w_acc = torch.exp(lse_acc - m)  # (B, H, S), in [0, 1]
    w_blk = torch.exp(lse_blk - m)
    total = w_acc + w_blk
    lse_acc.copy_(m + torch.log(total))
    total = torch.where(total > 0, total, torch.ones_like(total))
    out_acc.mul_((w_acc / total).unsqueeze(-1))
    out_acc.addcmul_(out_blk.to(out_acc.dtype), (w_blk / total).unsqueeze(-1))
