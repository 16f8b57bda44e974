"""``generate``: a CP prefill that leaves a KV cache sharded along the sequence, then decoding against it.

Note [CP generation]
~~~~~~~~~~~~~~~~~~~~
::

    prompts (B, S), left-padded as transformers pads batches (attention_mask)
      -> padded on the right to a multiple of 2 cp (zigzag): [ left pads | prompt | right pads ]
         document ids 0 | 1 | 2 keep every pad out of the prompt's attention; rotary positions count the
         prompt's tokens only (position 0 = the first real token), as transformers does
      -> prefill: every rank runs the model on its zigzag shard, attention is the CP call (forward only),
         each layer's K/V rows stay in this rank's cache (Note [Sharded KV cache])
      -> the rank holding position S - 1 turns its hidden state into logits; the first tokens are
         broadcast from it
      -> decode, step t: every rank runs the model on the new tokens (B, 1); the K/V of the token at
         step t go to rank t % cp; attention = local partials + one all-gather, merged by lse
      -> every rank returns the same (B, S + new) ids

Greedy by default; ``temperature`` > 0 samples (with ``top_k``) from one generator seeded identically on
every rank, so the ranks still agree. With tensor parallelism (Note [Generation TP],
:func:`~cp_dtensor.generation.tensor_parallel.apply_tp_for_generation`) every tp rank runs this on its heads;
pipeline stages are not part of this path.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from cp_dtensor.attention.api import process_group_of
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.generation.kv_cache import ShardedKVCache
from cp_dtensor.generation.mode import GenerationAttention
from cp_dtensor.layout import sequence_positions, shard_sequence_for_rank

__all__ = ["GenerationStats", "generate"]


class GenerationStats:
    """What one :func:`generate` call did on this rank: cache bytes, decode bytes sent per layer, times."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.padded_length = 0
        self.cache_bytes = 0
        self.cache_rows = 0
        self.decode_bytes_per_layer = 0
        self.prefill_seconds = 0.0
        self.decode_seconds: list[float] = []


def _check_left_padding(mask: torch.Tensor) -> None:
    if mask.dim() != 2 or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask must be (B, S) with the padding on the left (0s, then 1s), as transformers pads a batch "
            "of prompts for generation."
        )
    if bool((mask[:, -1] == 0).any()):
        raise ValueError(
            "attention_mask: every row needs at least one prompt token (its last entry must be 1)."
        )


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> torch.Tensor:
    """(B,) next tokens: argmax (greedy), or a sample of the tempered, top-k filtered distribution."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    mesh: DeviceMesh | dist.ProcessGroup | None = None,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    settings: CPSettings | None = None,
    stats: GenerationStats | None = None,
) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens after each prompt, with the prompt sharded over the CP ranks.

    Note [CP generation] describes the path: a CP prefill (zigzag shards, forward only) leaves each rank the
    K/V of its shard; every decode step attends to all shards with one all-gather of (out, lse) per layer.

    Args:
        model: a causal decoder of ``cp_dtensor.models`` (or any module with the same forward:
            ``model(tokens, positions=, rope_positions=, return_hidden=True)`` and an ``output`` head),
            identical on every rank (replicated weights), attention through SDPA or ``document_attention``.
        input_ids: (B, S) prompt ids, identical on every rank; any S.
        mesh: the 1-D CP mesh (or its process group); None for one process.
        max_new_tokens: tokens to generate per row (>= 1).
        attention_mask: (B, S) 1 for prompt tokens, 0 for left padding (a batch of prompts of different
            lengths, as transformers pads them); None: no padding.
        temperature: 0 (default): greedy; > 0: sample from softmax(logits / temperature).
        top_k: with sampling, keep the ``top_k`` most likely tokens.
        seed: the sampling generator's seed (the same on every rank).
        eos_token_id: rows that produced it keep producing ``pad_token_id``; all rows done ends early.
        pad_token_id: the id placed after a row's EOS.
        settings: CP settings of the prefill (strategy, backend); the layout is always zigzag.
        stats: optional :class:`GenerationStats` to fill.

    Returns:
        (B, S + n) ids, prompts followed by the generated tokens (n = ``max_new_tokens`` unless every row
        ended early), identical on every rank.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (B, S) with S >= 1, got shape {tuple(input_ids.shape)}.")
    group = process_group_of(mesh)
    cp = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    device = next(model.parameters()).device
    batch, prompt_len = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    _check_left_padding(mask)
    real = mask.bool()  # (B, S)
    multiple = 2 * cp if cp > 1 else 1
    padded = math.ceil(prompt_len / multiple) * multiple
    right = padded - prompt_len
    tokens = torch.cat([input_ids, input_ids.new_full((batch, right), pad_token_id)], dim=1)  # (B, S_pad)
    valid = torch.cat([real, real.new_zeros(batch, right)], dim=1)  # (B, S_pad)
    doc_ids = (
        torch.where(valid, 1, 0)
        + torch.cat([real.new_zeros(batch, prompt_len), real.new_ones(batch, right)], 1) * 2
    )
    documents = None if bool(valid.all()) else doc_ids.long()
    rope = (valid.long().cumsum(1) - 1).clamp_min(0)  # (B, S_pad): the prompt's own token count
    layout = "zigzag" if cp > 1 else "contiguous"
    base = settings or CPSettings()
    prefill_settings = base.with_options(layout=layout)
    local = [shard_sequence_for_rank(t, rank, cp, 1, layout) for t in (tokens, rope, valid)]  # (B, S_local)
    positions = sequence_positions(padded, rank, cp, layout).expand(batch, -1)  # (B, S_local)
    per_rank_new = math.ceil(max_new_tokens / cp)
    cache = ShardedKVCache(group, padded // cp + per_rank_new)
    attn_mask = AttentionMask(True, (-1, -1), None if documents is None else documents.to(device))
    mode = GenerationAttention(cache, prefill_settings, attn_mask, local[2].to(device))
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    t0 = time.perf_counter()
    with mode.start(decoding=False):
        hidden = model(
            local[0].to(device),
            positions=positions.to(device),
            rope_positions=local[1].to(device),
            return_hidden=True,
        )  # (B, S_local, dim)
    last = prompt_len - 1  # every row's last prompt token (left padding)
    owner = next(r for r in range(cp) if bool((sequence_positions(padded, r, cp, layout) == last).any()))
    logits = model.output(hidden[:, :1])[:, 0]  # (B, V): the owner overwrites it with the real ones
    if rank == owner:
        index = int((positions[0] == last).nonzero()[0, 0])
        logits = model.output(hidden[:, index])  # (B, V)
    if group is not None:  # every rank samples from the same logits with the same generator
        dist.broadcast(logits, group=group, group_src=owner)
    nxt = _sample(logits, temperature, top_k, gen)  # (B,)
    prefill_s = time.perf_counter() - t0
    out = [nxt.to(input_ids.device)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    if eos_token_id is not None:
        done |= nxt == eos_token_id
    row_len = real.sum(1).to(device)  # (B,) prompt tokens per row
    decode_times = []
    for step in range(max_new_tokens - 1):
        if eos_token_id is not None and bool(done.all()):
            break
        t0 = time.perf_counter()
        rope_pos = (row_len + step).unsqueeze(1)  # (B, 1): the rotary position of the new token
        with mode.start(decoding=True, owner=step % cp == rank):
            hidden = model(nxt.unsqueeze(1), positions=rope_pos, rope_positions=rope_pos, return_hidden=True)
        nxt = _sample(model.output(hidden[:, -1]), temperature, top_k, gen)  # (B,), the same on every rank
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt.to(input_ids.device))
        decode_times.append(time.perf_counter() - t0)
    if stats is not None:
        first = cache.layers[0] if cache.layers else None
        stats.prompt_tokens, stats.padded_length = prompt_len, padded
        stats.cache_bytes = cache.bytes()
        stats.cache_rows = first.length if first is not None else 0
        if cp > 1 and first is not None:  # one (out | lse) message, fp32
            heads = _local_query_heads(model, first.k.shape[1])
            stats.decode_bytes_per_layer = batch * heads * (first.k.shape[3] + 1) * 4
        stats.prefill_seconds, stats.decode_seconds = prefill_s, decode_times
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)


def _local_query_heads(model: nn.Module, local_kv_heads: int) -> int:
    """Query heads on this rank: the cache's KV heads (after any tp split) times the GQA group size."""
    args = getattr(model, "args", None)
    group = int(getattr(args, "n_heads", 1)) // int(getattr(args, "kv_heads", 1) or 1)
    return local_kv_heads * group
