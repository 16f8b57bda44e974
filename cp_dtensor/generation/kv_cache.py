"""A KV cache sharded along the sequence over the CP ranks, and attention of new tokens against it.

Note [Sharded KV cache]
~~~~~~~~~~~~~~~~~~~~~~~
After the prefill every rank keeps the K/V of the prompt tokens it held (its CP shard, S / cp of them per
layer), never the whole sequence. A decode step runs the whole model on the new token on every rank (the
same input, the same weights: the same hidden states); only attention is split::

    rank r:  cache_r = [ K/V of its prompt shard | the new tokens placed on r ]       (B, Hkv, L_r, D)
             the new token's K/V is appended on rank  step % cp  before attending (the shards stay within
             one token of each other), so exactly one rank holds it
             (o_r, lse_r) = softmax(q K_r^T * scale) V_r over the valid rows of cache_r   fp32, (B, Hq, D)
    all_gather [o_r | lse_r] over cp           one message of B x Hq x (D + 1) fp32 per rank and layer
    every rank:  lse = logsumexp_r lse_r,  o = sum_r exp(lse_r - lse) o_r         (Note [LSE merge])

Rows that are not tokens of the sequence (left padding of a batch of prompts, the right padding that makes
the prompt length a multiple of the layout's chunks) are stored but invalid: a per-row mask excludes them.
A rank with no valid row yet contributes (o = 0, lse = -inf), which the merge weighs 0. The merge runs in
the same order on every rank, so every rank gets bit-identical outputs and picks the same next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["LayerCache", "ShardedKVCache", "decode_attention", "merge_partials"]


@dataclass
class LayerCache:
    """One layer's cache on one rank: K, V (B, Hkv, capacity, D) and which rows hold tokens."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor  # (B, capacity) bool
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Store ``k``, ``v`` (B, Hkv, n, D) with their (B, n) validity after the rows already held."""
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            grow = max(n, self.k.shape[2])
            self.k = torch.cat([self.k, self.k.new_empty(*self.k.shape[:2], grow, self.k.shape[3])], dim=2)
            self.v = torch.cat([self.v, self.v.new_empty(*self.v.shape[:2], grow, self.v.shape[3])], dim=2)
            self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], grow)], dim=1)
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.valid[:, self.length : self.length + n] = valid
        self.length += n


@dataclass
class ShardedKVCache:
    """Per-layer caches of this rank (Note [Sharded KV cache]).

    Attributes:
        group: the CP process group (None: one process).
        capacity: rows to preallocate per layer (the prompt shard plus this rank's share of new tokens).
        layers: one :class:`LayerCache` per attention layer, created by the prefill.
    """

    group: dist.ProcessGroup | None
    capacity: int
    layers: list[LayerCache] = field(default_factory=list)

    @property
    def cp(self) -> int:
        """The number of CP ranks sharing the sequence."""
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This rank in the CP group."""
        return 0 if self.group is None else dist.get_rank(self.group)

    def layer(self, index: int, like: torch.Tensor) -> LayerCache:
        """The cache of layer ``index``, allocated like ``like`` (B, Hkv, n, D) on first use."""
        while len(self.layers) <= index:
            b, h, _, d = like.shape
            empty = like.new_empty(b, h, self.capacity, d)
            self.layers.append(
                LayerCache(
                    empty, empty.clone(), torch.zeros(b, self.capacity, dtype=torch.bool, device=like.device)
                )
            )
        return self.layers[index]

    def bytes(self) -> int:
        """Bytes of K/V this rank holds (allocated rows included)."""
        return sum(2 * c.k.numel() * c.k.element_size() for c in self.layers)


def decode_attention(q: torch.Tensor, cache: LayerCache, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial attention of ``q`` (B, Hq, 1, D) over its valid cache rows, in fp32.

    Returns:
        ``(out (B, Hq, D), lse (B, Hq))``; rows with no valid key give out 0 and lse -inf.
    """
    b, hq, _, d = q.shape
    k, v = cache.k[:, :, : cache.length].float(), cache.v[:, :, : cache.length].float()  # (B, Hkv, L, D)
    hkv = k.shape[1]
    qf = q.float().view(b, hkv, hq // hkv, d)  # (B, Hkv, rep, D): query head h uses KV head h // rep
    scores = torch.einsum("bgrd,bgld->bgrl", qf, k) * scale  # (B, Hkv, rep, L)
    valid = cache.valid[:, None, None, : cache.length]  # (B, 1, 1, L)
    scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, rep)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with no key: 0
    out = torch.einsum("bgrl,bgld->bgrd", weights, v)  # (B, Hkv, rep, D)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Merge every rank's partial ``(out (B, Hq, D), lse (B, Hq))`` by log-sum-exp (Note [Sharded KV cache]).

    One all-gather of B x Hq x (D + 1) fp32 per rank; returns (B, Hq, D) fp32, identical on every rank.
    """
    if group is None or dist.get_world_size(group) == 1:
        return out
    cp = dist.get_world_size(group)
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).contiguous()  # (B, Hq, D + 1)
    gathered = packed.new_empty(cp * packed.shape[0], *packed.shape[1:])
    dist.all_gather_single(gathered, packed, group=group)
    gathered = gathered.view(cp, *packed.shape)  # (cp, B, Hq, D + 1)
    outs, lses = gathered[..., :-1], gathered[..., -1]  # (cp, B, Hq, D), (cp, B, Hq)
    top = lses.max(dim=0).values  # (B, Hq)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)  # (cp, B, Hq), 0 for ranks without keys
    total = weights.sum(dim=0).clamp_min(torch.finfo(weights.dtype).tiny)
    return (weights.unsqueeze(-1) * outs).sum(dim=0) / total.unsqueeze(-1)
