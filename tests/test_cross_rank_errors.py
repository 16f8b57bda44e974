"""Never silently wrong, never a hang: calls CP attention cannot serve exactly raise on every rank.

Each case reproduces a report of the adversarial pass (issue "Never silently wrong"): ranks that disagree on
layout, mask, comm mode or sequence length; one rank's bad input; an empty sequence; heads that a tp axis
cannot split; double backward; an out-of-range sequence dim. Every case runs in a live gloo group, so a
hang would fail the test by the pool's timeout instead of passing.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import cached_world_mesh
from torch.distributed.tensor import DTensor, Shard

import cp_dtensor as cpd
from cp_dtensor.attention import consistency
from cp_dtensor.layout import shard_sequence_for_rank


def _qkv(s_local: int, hq: int = 2, hkv: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, s_local, 8, generator=g, requires_grad=True) for h in (hq, hkv, hkv)]


def _error_of(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def run_mismatches() -> dict[str, str]:
    """On 2 ranks: calls that differ between the ranks, or fail on one rank only."""
    rank = dist.get_rank()
    mesh = cached_world_mesh(cp=2)["cp"]
    found = {}
    q, k, v = _qkv(8)
    found["layout"] = _error_of(
        lambda: cpd.ring_attention(
            q, k, v, mesh, is_causal=True, layout="zigzag" if rank == 0 else "contiguous"
        )
    )
    found["causal"] = _error_of(lambda: cpd.ring_attention(q, k, v, mesh, is_causal=rank == 0))
    found["comm"] = _error_of(
        lambda: cpd.ring_attention(q, k, v, mesh, comm="p2p" if rank == 0 else "allgather")
    )
    q2, k2, v2 = _qkv(8 if rank == 0 else 12)
    found["seq_len"] = _error_of(lambda: cpd.ring_attention(q2, k2, v2, mesh, is_causal=True))
    bad = [t[0] if rank == 1 else t for t in (q, k, v)]  # rank 1 passes 3-D tensors
    found["one_rank_bad_input"] = _error_of(lambda: cpd.ring_attention(*bad, mesh, is_causal=True))
    return found


def test_ranks_that_disagree_raise_on_every_rank(dist_pool) -> None:
    for rank, found in enumerate(dist_pool(2).run(run_mismatches, timeout_s=120)):
        assert "layout (rank 0: 'zigzag', rank 1: 'contiguous')" in found["layout"], found
        assert "is_causal (rank 0: True, rank 1: False)" in found["causal"], found
        assert "comm (rank 0: 'p2p', rank 1: 'allgather')" in found["comm"], found
        assert "q_shape (rank 0: (1, 2, 8, 8), rank 1: (1, 2, 12, 8))" in found["seq_len"], found
        # rank 1 fails its own check; rank 0 fails fast with rank 1's message instead of waiting in the ring
        assert "must be 4-D (B, H, S_local, D)" in found["one_rank_bad_input"], found
        if rank == 0:
            assert "failed on rank 1 of the CP group" in found["one_rank_bad_input"], found


def run_per_call_check_cost() -> list[tuple[int, int]]:
    """(all_reduce, all_gather_object) calls made by the check over three identical calls and a new shape."""
    mesh = cached_world_mesh(cp=2)["cp"]
    counts = {"all_reduce": 0, "all_gather_object": 0}
    real = {name: getattr(consistency.dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return real[name](*args, **kwargs)

        return call

    for name in counts:
        setattr(consistency.dist, name, counting(name))
    try:
        per_call = []
        for s_local in (16, 16, 16, 24):
            before = dict(counts)
            q, k, v = _qkv(s_local, seed=s_local)
            cpd.ring_attention(q, k, v, mesh, is_causal=True).sum().backward()
            per_call.append(tuple(counts[n] - before[n] for n in ("all_reduce", "all_gather_object")))
        return per_call
    finally:
        for name, fn in real.items():
            setattr(consistency.dist, name, fn)


def test_every_call_is_checked_with_one_fixed_size_collective(dist_pool) -> None:
    """Note [Cross-rank call check]: one small all-reduce per call, on every rank, whatever it saw before;
    the descriptive all-gather only when something differs (never here); backward adds nothing."""
    for per_call in dist_pool(2).run(run_per_call_check_cost):
        assert per_call == [(1, 0)] * 4, per_call


def run_mask_changes() -> dict[str, str]:
    """Issue 25 items 5 and 11: masks that differ between ranks, after both ranks saw the same call."""
    rank = dist.get_rank()
    mesh = cached_world_mesh(cp=2)["cp"]
    q, k, v = _qkv(8)
    ids_a = torch.tensor([[0] * 6 + [1] * 10])
    ids_b = torch.tensor([[0] * 9 + [1] * 7])
    found = {}
    for ids in (ids_a, ids_a):  # both ranks check and run the same call twice
        cpd.ring_attention(q, k, v, mesh, is_causal=True, document_ids=ids)
    # rank 0 moves on to new ids, rank 1 repeats the ones it has checked: formerly a hang until the timeout
    found["new_ids_on_one_rank"] = _error_of(
        lambda: cpd.ring_attention(q, k, v, mesh, is_causal=True, document_ids=ids_b if rank == 0 else ids_a)
    )
    found["window_on_one_rank"] = _error_of(
        lambda: cpd.ring_attention(
            q, k, v, mesh, is_causal=True, document_ids=ids_a, window_size=(3, 0) if rank == 0 else (-1, -1)
        )
    )
    # ids refilled in place without a version bump (torch.from_numpy of a reused buffer): never stale
    buffer = ids_a.numpy().copy()
    ids = torch.from_numpy(buffer)
    first = cpd.ring_attention(q, k, v, mesh, is_causal=True, document_ids=ids).detach()
    buffer[:] = ids_b.numpy()
    refilled = cpd.ring_attention(q, k, v, mesh, is_causal=True, document_ids=ids).detach()
    fresh = cpd.ring_attention(q, k, v, mesh, is_causal=True, document_ids=ids_b.clone()).detach()
    found["refilled_equals_fresh"] = str(torch.equal(refilled, fresh) and not torch.equal(first, fresh))
    return found


def test_masks_that_change_on_one_rank_raise_instead_of_hanging(dist_pool) -> None:
    for found in dist_pool(2).run(run_mask_changes):
        for case in ("new_ids_on_one_rank", "window_on_one_rank"):
            assert "calls differ across the ranks" in found[case] and "mask (rank 0:" in found[case], found
        assert found["refilled_equals_fresh"] == "True", found


def run_edge_cases() -> dict[str, object]:
    rank = dist.get_rank()
    mesh = cached_world_mesh(cp=2)["cp"]
    found: dict[str, object] = {}
    # An empty sequence: an empty result and gradients, like SDPA (the CPU kernel dies of SIGFPE on it).
    q, k, v = _qkv(0)
    out = cpd.ring_attention(q, k, v, mesh, is_causal=True)
    out.sum().backward()
    found["empty"] = (tuple(out.shape), tuple(q.grad.shape))
    # Double backward: a clear refusal for both comm modes.
    for comm in ("p2p", "allgather"):
        q, k, v = _qkv(8)
        out = cpd.ring_attention(q, k, v, mesh, is_causal=True, comm=comm)
        found[f"double_backward_{comm}"] = _error_of(
            lambda out=out, q=q: torch.autograd.grad(out.sum(), q, create_graph=True)
        )
    # A sequence dim out of range: an error, not a silent wrap-around to another dim.
    x = torch.zeros(1, 2, 8, 4)
    found["seq_dim"] = _error_of(lambda: cpd.shard_sequence(x, mesh, 7))
    found["seq_dim_neg"] = _error_of(lambda: shard_sequence_for_rank(x, rank, 2, -5, "zigzag"))
    return found


def test_edge_cases_are_exact_or_refused(dist_pool) -> None:
    for found in dist_pool(2).run(run_edge_cases, timeout_s=120):
        assert found["empty"] == ((1, 2, 0, 8), (1, 2, 0, 8))
        for comm in ("p2p", "allgather"):
            assert (
                "does not support double backward (create_graph=True" in found[f"double_backward_{comm}"]
            ), found
        assert "seq_dim 7 is out of range for a 4-D tensor (valid: -4 .. 3)" in found["seq_dim"]
        assert "seq_dim -5 is out of range for a 4-D tensor" in found["seq_dim_neg"]


def run_heads_over_tp() -> str:
    """MQA (Hq=2, Hkv=1) with heads Shard(1) over tp=2: one KV head cannot be split over two ranks."""
    mesh = cached_world_mesh(cp=2, tp=2)["cp", "tp"]
    q = DTensor.from_local(torch.randn(1, 1, 8, 4), mesh, [Shard(2), Shard(1)], run_check=False)
    kv = DTensor.from_local(
        torch.randn(1, 1, 8, 4),
        mesh,
        [Shard(2), Shard(1)],
        run_check=False,
        shape=(1, 1, 16, 4),
        stride=(64, 64, 4, 1),
    )
    with cpd.ContextParallelAttention():
        return _error_of(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True))


def test_heads_that_tp_cannot_split_are_refused(dist_pool) -> None:
    for message in dist_pool(4).run(run_heads_over_tp, timeout_s=120):
        assert "Shard(1) over mesh axis 'tp' of size 2" in message and "the 1 key/value heads" in message, (
            message
        )


@pytest.mark.parametrize("dim", [7, -5])
def test_shard_sequence_for_rank_rejects_out_of_range_dims(dim: int) -> None:
    with pytest.raises(ValueError, match=f"seq_dim {dim} is out of range"):
        shard_sequence_for_rank(torch.zeros(2, 2, 8, 4), 0, 2, dim, "zigzag")
