"""Masked CP attention (packed documents, sliding windows): exactness, parity, work, bytes, memory, errors.

References: single-process SDPA with the equivalent dense boolean mask (``AttentionMask.dense``) on the
full sequence. Tolerances, as in test_ring_attention.py (same reasons):

* fp64 simulation: 1e-12 absolute - pieces and merges only reorder fp64 sums.
* fp32 / bf16, multi-process: within RATIO x the error of the single-process dense-mask SDPA in the same
  dtype (fp32 2.5, bf16 3), floors fp32 2e-6 / bf16 4e-3, ceilings fp32 1e-5 / bf16 8e-2.
* Work: score elements requested == visible pairs exactly (the pieces are exact by construction, checked).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import cached_world_mesh

import cp_dtensor as cpd
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.mask_schedule import PieceKind, band_pieces, build_masked_plan
from cp_dtensor.layout import sequence_positions, shard_sequence_for_rank

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3}
CEILING = {torch.float32: 1e-5, torch.bfloat16: 8e-2}
RATIO = {torch.float32: 2.5, torch.bfloat16: 3.0}
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def documents(kind: str, batch: int, seq_len: int, seed: int) -> torch.Tensor | None:
    """(B, S) document ids: "long_tailed" (log-normal lengths, a few long), "many_short" (1-8 tokens),
    "one" (no ids: one document per row)."""
    if kind == "one":
        return None
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    for b in range(batch):
        pos, doc = 0, 0
        while pos < seq_len:
            if kind == "long_tailed":
                length = int(torch.exp(torch.randn((), generator=g) * 1.2).item() * seq_len / 10) + 1
            else:
                length = int(torch.randint(1, 9, (), generator=g))
            ids[b, pos : pos + length] = doc
            pos, doc = pos + length, doc + 1
    return ids


@dataclass(frozen=True)
class MaskCase:
    docs: str
    causal: bool
    window: tuple[int, int]

    @property
    def id(self) -> str:
        w = "" if self.window == (-1, -1) else f"-w{self.window[0]}_{self.window[1]}"
        return f"{self.docs}-{'causal' if self.causal else 'bidir'}{w}"


# S_local is 32 in the multi-process cases and 24 in the simulation: windows of 5 / 3 are smaller than a
# shard, 40 larger.
MASKS = [
    MaskCase("long_tailed", True, (-1, -1)),
    MaskCase("many_short", True, (-1, -1)),
    MaskCase("long_tailed", True, (5, 0)),
    MaskCase("one", True, (40, 0)),
    MaskCase("long_tailed", False, (3, 3)),
    MaskCase("many_short", False, (-1, -1)),
]


def _inputs(batch: int, heads: str, seq_len: int, dtype: torch.dtype, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hq, hkv = HEADS[heads]
    shapes = [
        (batch, hq, seq_len, 16),
        (batch, hkv, seq_len, 16),
        (batch, hkv, seq_len, 16),
        (batch, hq, seq_len, 16),
    ]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _dense_reference(
    q, k, v, dout, mask: AttentionMask, dtype: torch.dtype, scale: float | None = None
) -> list[torch.Tensor]:
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    dense = mask.dense(q.shape[2]).unsqueeze(1)  # (B or 1, 1, S, S)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense, enable_gqa=q.shape[1] != k.shape[1], scale=scale
    )
    out.backward(dout.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


# ---- the pieces ----------------------------------------------------------------------------------------


def test_band_pieces_cover_exactly_the_visible_pairs() -> None:
    """Random documents, windows, query and key ranges: the pieces tile the visible region, no overlap."""
    rng = random.Random(0)
    for _ in range(300):
        s = rng.randint(1, 48)
        ids = torch.zeros(1, s, dtype=torch.int64)
        for cut in rng.sample(range(1, s), min(rng.randint(0, 5), s - 1)) if s > 1 else []:
            ids[0, cut:] += 1
        mask = AttentionMask(
            rng.random() < 0.5,
            (rng.choice([-1, 0, 1, 3, 9]), rng.choice([-1, 0, 2, 5])),
            ids if rng.random() < 0.7 else None,
        )
        lo, hi = mask.intervals(s)
        a, b = sorted(rng.sample(range(s + 1), 2))
        c, d = sorted(rng.sample(range(s + 1), 2))
        covered = torch.zeros(s, s, dtype=torch.int64)
        for q0, q1, k0, k1, kind in band_pieces(lo[0], hi[0], (a, b), (c, d)):
            block = torch.ones(q1 - q0, k1 - k0, dtype=torch.int64)
            if kind is not PieceKind.FULL:
                assert q1 - q0 == k1 - k0
                block = block.tril() if kind is PieceKind.LOWER else block.triu()
            covered[q0:q1, k0:k1] += block
        want = torch.zeros(s, s, dtype=torch.int64)
        want[a:b, c:d] = mask.dense(s)[0, a:b, c:d].long()
        assert torch.equal(covered, want), (ids, mask.is_causal, mask.window, (a, b, c, d))


# ---- fp64 simulation: exact for every layout, comm, head layout and mask -------------------------------


@pytest.mark.parametrize("case", MASKS, ids=lambda c: c.id)
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize("comm", ["p2p", "allgather"])
def test_simulated_masked_ring_is_exact_in_fp64(case: MaskCase, cp: int, layout: str, comm: str) -> None:
    heads = list(HEADS)[(cp + len(case.id)) % 3]  # rotate MHA / GQA / MQA over the grid
    s = 24 * cp
    ids = documents(case.docs, 2, s, seed=cp)
    if layout == "balanced":
        ids_for_layout = ids if ids is not None else torch.zeros(2, s, dtype=torch.int64)
        layout = cpd.balanced_layout(ids_for_layout, cp, is_causal=case.causal, window_size=case.window)
    q, k, v, dout = _inputs(2, heads, s, torch.float64)
    mask = AttentionMask(case.causal, case.window, ids)
    want = _dense_reference(q, k, v, dout, mask, torch.float64)
    res = cpd.simulate_context_parallel_attention(
        q, k, v, cp, grad_out=dout, is_causal=case.causal, layout=layout, comm=comm, document_ids=ids,
        window_size=case.window,
    )  # fmt: skip
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (res.out, res.dq, res.dk, res.dv), want):
        assert (got - ref).abs().max().item() <= 1e-12, f"{case.id} cp{cp} {layout} {comm} {heads}: {name}"


@pytest.mark.parametrize(
    ("comm", "a2a_size"), [("p2p", None), ("allgather", None), ("alltoall", None), ("hybrid", 2)]
)
def test_a_non_default_scale_reaches_every_masked_piece(comm: str, a2a_size: int | None) -> None:
    """Documents + a window with scale 0.3 (not 1/sqrt(D)): exact in fp64 for every comm mode."""
    cp, s = 4, 96
    ids = documents("many_short", 2, s, seed=3)
    q, k, v, dout = _inputs(2, "gqa", s, torch.float64)
    mask = AttentionMask(True, (20, 0), ids)
    want = _dense_reference(q, k, v, dout, mask, torch.float64, scale=0.3)
    res = cpd.simulate_context_parallel_attention(
        q, k, v, cp, grad_out=dout, is_causal=True, scale=0.3, comm=comm, a2a_size=a2a_size,
        document_ids=ids, window_size=(20, 0),
    )  # fmt: skip
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (res.out, res.dq, res.dk, res.dv), want):
        assert (got - ref).abs().max().item() <= 1e-12, f"{comm}: {name}"


def test_no_mask_takes_the_unmasked_ring_bit_for_bit() -> None:
    """Defaults (no documents, window (-1, -1), a named layout): the very same code path as before."""
    q, k, v, dout = _inputs(2, "gqa", 64, torch.float32)
    plain = cpd.simulate_context_parallel_attention(q, k, v, 2, grad_out=dout, is_causal=True)
    defaults = cpd.simulate_context_parallel_attention(
        q, k, v, 2, grad_out=dout, is_causal=True, document_ids=None, window_size=(-1, -1)
    )
    for a, b in zip(
        (plain.out, plain.dq, plain.dk, plain.dv), (defaults.out, defaults.dq, defaults.dk, defaults.dv)
    ):
        assert torch.equal(a, b)
    # and the unmasked ring's work counters, not the masked plan's (kernel calls: 2 per rank at CP 2)
    assert (
        [s.kernel_calls_forward for s in plain.stats]
        == [s.kernel_calls_forward for s in defaults.stats]
        == [2, 2]
    )


# ---- multi-process parity and accounting ---------------------------------------------------------------


def run_masked_parity(dtypes: list[torch.dtype]) -> dict[str, dict]:
    """Every mask case x layout x comm on the real process group; errors and accounting per case."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    mesh = cached_world_mesh(cp=cp)["cp"]
    s_local, batch = 32, 2
    s = s_local * cp
    results = {}
    for case, layout_name, comm, dtype in itertools.product(
        MASKS, ("zigzag", "contiguous", "balanced"), ("p2p", "allgather"), dtypes
    ):
        heads = list(HEADS)[len(results) % 3]
        ids = documents(case.docs, batch, s, seed=11)
        layout = layout_name
        if layout_name == "balanced":
            layout = cpd.balanced_layout(
                ids if ids is not None else torch.zeros(batch, s, dtype=torch.int64), cp, is_causal=case.causal,
                window_size=case.window,
            )  # fmt: skip
        q, k, v, dout = _inputs(batch, heads, s, dtype, seed=3)
        mask = AttentionMask(case.causal, case.window, ids)
        ref = _dense_reference(q, k, v, dout, mask, torch.float64)
        base = _dense_reference(q, k, v, dout, mask, dtype)
        local = [shard_sequence_for_rank(t, rank, cp, 2, layout).requires_grad_() for t in (q, k, v)]
        stats = cpd.AttentionStats()
        saved: list[int] = []

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = cpd.ring_attention(
                *local, mesh, is_causal=case.causal, layout=layout, comm=comm, document_ids=ids,
                window_size=case.window, stats=stats,
            )  # fmt: skip
        out.backward(shard_sequence_for_rank(dout, rank, cp, 2, layout))
        got = [out, *(t.grad for t in local)]
        positions = sequence_positions(s, rank, cp, layout)
        counts = mask.visible_counts(s).expand(batch, s)
        rows = positions if positions.dim() == 2 else positions.expand(batch, -1)
        visible = int(counts.gather(1, rows).sum()) * q.shape[1]  # B x Hq x visible pairs of my queries
        plan = build_masked_plan(mask, layout, cp, s, rank)
        row_bytes = 2 * batch * k.shape[1] * k.shape[3] * k.element_size()  # one K and V row, all heads
        local_bytes = (
            sum(t.numel() * t.element_size() for t in (*local, out)) + batch * q.shape[1] * s_local * 4
        )
        results[f"cp{cp}-{case.id}-{layout_name}-{comm}-{heads}-{str(dtype).removeprefix('torch.')}"] = {
            "dtype": dtype,
            "cp": [
                (g.double() - shard_sequence_for_rank(r, rank, cp, 2, layout)).abs().max().item()
                for g, r in zip(got, ref)
            ],
            "single": [(b.double() - r).abs().max().item() for b, r in zip(base, ref)],
            "score_elements": stats.score_elements_forward,
            "visible": visible,
            "bytes_forward": stats.bytes_sent_forward,
            "full_ring_bytes": (cp - 1) * s_local * row_bytes,
            "min_bytes": sum(n for src, n in enumerate(plan.needed_rows()) if src != rank) * row_bytes,
            "saved_bytes": sum(saved),
            "local_bytes": local_bytes,
        }
    return results


@pytest.fixture(scope="module")
def masked_parity(dist_pool, report_dir):
    cache: dict[int, list[dict]] = {}

    def get(cp: int) -> list[dict]:
        if cp not in cache:
            cache[cp] = dist_pool(cp).run(run_masked_parity, [torch.float32, torch.bfloat16], timeout_s=900)
            if report_dir is not None:
                _write_report(report_dir / f"masked_attention_cp{cp}.md", cache[cp])
        return cache[cp]

    return get


def _write_report(path, per_rank: list[dict]) -> None:
    lines = [
        "| case | max err out / dq / dk / dv | single-process | score elements / visible | work max/mean "
        "| fwd bytes / full ring | fwd bytes / minimum | saved / local |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in per_rank[0]:
        rows = [r[key] for r in per_rank]
        err = [max(r["cp"][i] for r in rows) for i in range(4)]
        work = [r["visible"] for r in rows]
        fwd = max(r["bytes_forward"] for r in rows)
        minimum = max(r["min_bytes"] for r in rows)
        lines.append(
            f"| {key} | {' / '.join(f'{e:.1e}' for e in err)} | {' / '.join(f'{e:.1e}' for e in rows[0]['single'])} "
            f"| {sum(r['score_elements'] for r in rows) / sum(work):.3f} | {max(work) / (sum(work) / len(work)):.3f} "
            f"| {fwd / rows[0]['full_ring_bytes']:.3f} | {fwd / max(minimum, 1):.2f} "
            f"| {max(r['saved_bytes'] / r['local_bytes'] for r in rows):.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_masked_ring_matches_dense_mask_sdpa(cp: int, masked_parity) -> None:
    for per_rank in masked_parity(cp):
        for key, res in per_rank.items():
            dtype = res["dtype"]
            for name, e_cp, e_single in zip(("out", "dq", "dk", "dv"), res["cp"], res["single"]):
                bound = min(max(RATIO[dtype] * e_single, FLOOR[dtype]), CEILING[dtype])
                assert e_cp <= bound, (
                    f"{key}: {name} {e_cp:.3g} > {bound:.3g} (single-process {e_single:.3g})"
                )


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_masked_ring_computes_only_visible_pairs_and_sends_only_needed_rows(cp: int, masked_parity) -> None:
    for per_rank in masked_parity(cp):
        for key, res in per_rank.items():
            assert res["score_elements"] == res["visible"], key  # no masked score is ever computed
            if "p2p" in key:
                assert res["bytes_forward"] <= res["full_ring_bytes"], key
            # only local tensors are saved: q, k, v, out (the input dtype) and the fp32 lse
            assert res["saved_bytes"] <= res["local_bytes"], key


def run_window_traffic() -> list[int]:
    """Contiguous layout, causal window of 5 rows: each rank needs only 5 rows of its left neighbour."""
    rank, cp = dist.get_rank(), dist.get_world_size()
    mesh = cached_world_mesh(cp=cp)["cp"]
    q, k, v, _ = _inputs(1, "mha", 32 * cp, torch.float32)
    local = [shard_sequence_for_rank(t, rank, cp, 2, "contiguous") for t in (q, k, v)]
    stats = cpd.AttentionStats()
    cpd.ring_attention(*local, mesh, is_causal=True, layout="contiguous", window_size=(5, 0), stats=stats)
    return [stats.bytes_sent_forward, local[1].shape[1] * local[1].shape[3] * 4 * 2]


def test_window_sends_only_the_neighbours_tail(dist_pool) -> None:
    results = dist_pool(2).run(run_window_traffic)
    row_bytes = results[0][1]
    assert results[0][0] == 5 * row_bytes  # rank 0 -> rank 1: its last 5 rows, nothing else
    assert results[1][0] == 0  # rank 1's KV is after every query of rank 0: nothing is sent


# ---- bad input: errors before any communication ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"document_ids": torch.zeros(2, 64, dtype=torch.float32)}, "integer dtype"),
        ({"document_ids": torch.zeros(64, dtype=torch.int64)}, r"must be a \(B, S\) integer tensor"),
        (
            {"document_ids": torch.zeros(2, 32, dtype=torch.int64)},
            r"has shape \(2, 32\) but the attention call needs \(B, S\) = \(2, 64\)",
        ),
        (
            {"document_ids": torch.tensor([[0] * 30 + [1] * 4 + [0] * 30] * 2)},
            "reappears after another document",
        ),
        ({"window_size": (-2, 0)}, r"window_size must be \(left, right\) with integers >= -1"),
        ({"window_size": (3,)}, r"window_size must be \(left, right\)"),
    ],
)
def test_bad_mask_inputs_are_refused(kwargs: dict, match: str) -> None:
    q, k, v, _ = _inputs(2, "gqa", 64, torch.float32)
    with pytest.raises(ValueError, match=match):
        cpd.simulate_context_parallel_attention(q, k, v, 2, is_causal=True, **kwargs)


def test_layout_built_for_another_batch_is_refused() -> None:
    q, k, v, _ = _inputs(2, "gqa", 64, torch.float32)
    ids = torch.zeros(2, 64, dtype=torch.int64)
    with pytest.raises(ValueError, match="was built for CP size 4 and sequence length 64"):
        cpd.simulate_context_parallel_attention(
            q, k, v, 2, layout=cpd.balanced_layout(ids, 4), document_ids=ids
        )
    with pytest.raises(ValueError, match="was built for CP size 2 and sequence length 32"):
        cpd.simulate_context_parallel_attention(
            q, k, v, 2, layout=cpd.balanced_layout(ids[:, :32], 2), document_ids=ids
        )


def run_travelling_layout() -> dict:
    """A training step with BalancedLayoutRule: how often the rule plans, and the loss with and without the
    travelling layout (Note [Travelling layout])."""
    from dist_harness import cached_parallel_dims

    import cp_dtensor.balance as balance
    from cp_dtensor.models.llama import build_llama
    from cp_dtensor.parallelize import build_parallel_model
    from cp_dtensor.sharding import shard_batch
    from cp_dtensor.train_step import train_step

    pd = cached_parallel_dims(cp=2)
    rule = cpd.BalancedLayoutRule()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 512, (2, 65), generator=g)
    ids = torch.zeros(2, 64, dtype=torch.int64)
    ids[0, 9:], ids[0, 41:], ids[1, 30:] = 1, 2, 1
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "document_ids": ids}
    calls = []
    original = balance.balanced_layout

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    losses = {}
    balance.balanced_layout = counting
    try:
        for travel in (True, False):
            model = build_llama("debug")
            model.init_weights(seed=0)
            pm = build_parallel_model(
                model, pd, device=torch.device("cpu"), cp_settings=cpd.CPSettings(layout=rule)
            )
            opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
            sharded = shard_batch(batch, pd.batch_mesh, layout=rule)
            if not travel:  # the fallback: the style applies its rule to the call's document ids
                sharded.pop("layout_positions")
            rule._memo.clear()
            calls.clear()
            losses[travel] = train_step(pm.model_parts, [opt], sharded, loss_mesh=pd.loss_mesh).loss
            losses[f"calls_{travel}"] = len(calls)
    finally:
        balance.balanced_layout = original
    return losses


def test_the_layout_travels_with_the_batch(dist_pool) -> None:
    """shard_batch resolves the rule once; with the travelling layout no attention call plans again (the
    fallback without it plans once more, then its memo serves the other layers); the losses are equal."""
    for res in dist_pool(2).run(run_travelling_layout):
        assert res["calls_True"] == 0 and res["calls_False"] == 1, res  # shard_batch's call: cleared before
        assert res[True] == res[False], res
