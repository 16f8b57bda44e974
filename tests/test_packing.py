"""Packed varlen calls per ring step (Note [Piece packing]): parity, call counts, the UPPER packing, the
default varlen loop, the setting.

References and tolerances:

* fp64, packed against per piece and against single-process SDPA with the dense mask: 1e-12 absolute -
  packing only reorders fp64 sums (the merge of a row's parts happens at once instead of piece by piece).
  Measured <= 2e-15 (packed vs per piece) and 3.6e-15 (vs dense).
* fp32, packed against fp64 dense SDPA: within 2.5x the error of fp32 dense SDPA, floor 2e-6 (the rule of
  test_masked_attention.py); packed against per piece in fp32: 4 fp32 ulps of each tensor's largest value
  (the merge and the dK/dV sums round in another order; measured <= 1 ulp: 9.5e-7 on dK/dV of magnitude ~10).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import cp_dtensor as cpd
from cp_dtensor.attention.allgather import build_allgather_plan
from cp_dtensor.attention.kernels import KERNELS, AttentionKernel, MathKernel, equal_shape_batches
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.merge import merge_block_
from cp_dtensor.attention.packing import (
    _merge_rows_,
    apply_piece_packing,
    build_packed_step,
    packed_backward,
    packed_forward,
    pieces_packing,
    ring_packing,
)
from cp_dtensor.attention.plan import Piece, PieceKind, piece_backward, piece_forward
from cp_dtensor.attention.strategies import build_ring_plan_for

MODES = ("per_piece", "packed")
# (documents, causal, window): S_local = 24 at cp 4; windows smaller than a shard (5, 3) and larger (40).
MASKS = {
    "docs-causal": ("long", True, (-1, -1)),
    "short-docs-window": ("short", True, (5, 0)),
    "docs-bidir-window": ("long", False, (3, 3)),
    "one-doc-window": (None, True, (40, 0)),
}


def _documents(kind: str | None, batch: int, seq_len: int, seed: int) -> torch.Tensor | None:
    """(B, S) ids: "long" (log-normal lengths around S / 10), "short" (1-8 tokens), None (one document)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    for b in range(batch):
        pos = doc = 0
        while pos < seq_len:
            if kind == "long":
                n = int(torch.exp(torch.randn((), generator=g) * 1.2).item() * seq_len / 10) + 1
            else:
                n = int(torch.randint(1, 9, (), generator=g))
            ids[b, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    return ids


def _inputs(batch: int, seq_len: int, dtype: torch.dtype, hq: int = 4, hkv: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shapes = [
        (batch, hq, seq_len, 16),
        (batch, hkv, seq_len, 16),
        (batch, hkv, seq_len, 16),
        (batch, hq, seq_len, 16),
    ]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _dense(q, k, v, dout, mask: AttentionMask, dtype: torch.dtype) -> list[torch.Tensor]:
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.dense(q.shape[2]).unsqueeze(1), enable_gqa=True
    )
    out.backward(dout.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _simulate(q, k, v, dout, cp, layout, comm, ids, causal, window, mode, a2a_size=None):
    res = cpd.simulate_context_parallel_attention(
        q, k, v, cp, grad_out=dout, is_causal=causal, layout=layout, comm=comm, document_ids=ids,
        window_size=window, piece_packing=mode, a2a_size=a2a_size,
    )  # fmt: skip
    return res, [res.out, res.dq, res.dk, res.dv]


def _layout(name: str, ids, cp: int, causal: bool, window, batch: int, seq_len: int):
    if name != "balanced":
        return name
    ids = ids if ids is not None else torch.zeros(batch, seq_len, dtype=torch.int64)
    return cpd.balanced_layout(ids, cp, is_causal=causal, window_size=window)


def _max_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(got, want))


# ---- parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize(("comm", "a2a_size"), [("p2p", None), ("allgather", None)])
def test_packed_equals_per_piece_and_dense_sdpa_in_fp64(mask_name, layout, comm, a2a_size) -> None:
    """Every layout, p2p and all-gather, documents and windows: packed == per piece == dense SDPA (fp64),
    and the packed run makes fewer kernel calls for the same score elements."""
    docs, causal, window = MASKS[mask_name]
    cp, s = 4, 96
    ids = _documents(docs, 2, s, seed=3)
    lay = _layout(layout, ids, cp, causal, window, 2, s)
    q, k, v, dout = _inputs(2, s, torch.float64)
    want = _dense(q, k, v, dout, AttentionMask(causal, window, ids), torch.float64)
    (res_pp, per_piece), (res_pk, packed) = (
        _simulate(q, k, v, dout, cp, lay, comm, ids, causal, window, mode, a2a_size) for mode in MODES
    )
    assert _max_err(packed, per_piece) <= 1e-12
    assert _max_err(packed, want) <= 1e-12
    assert _max_err(per_piece, want) <= 1e-12
    calls = [sum(st.kernel_calls_forward for st in r.stats) for r in (res_pp, res_pk)]
    work = [sum(st.score_elements_forward for st in r.stats) for r in (res_pp, res_pk)]
    assert calls[1] < calls[0] and work[0] == work[1], (calls, work)
    bytes_sent = [
        [st.bytes_sent_forward + st.bytes_sent_backward for st in r.stats] for r in (res_pp, res_pk)
    ]
    assert bytes_sent[0] == bytes_sent[1]  # packing changes no message


@pytest.mark.parametrize(("comm", "a2a_size"), [("hybrid", 2), ("alltoall", None)])
def test_packed_hybrid_and_alltoall_in_fp64(comm: str, a2a_size: int | None) -> None:
    """The rings inside hybrid / all-to-all pack too (the flag travels with the kernel)."""
    cp, s = 4, 96
    ids = _documents("short", 2, s, seed=4)
    q, k, v, dout = _inputs(2, s, torch.float64)
    want = _dense(q, k, v, dout, AttentionMask(True, (20, 0), ids), torch.float64)
    (res_pp, per_piece), (res_pk, packed) = (
        _simulate(q, k, v, dout, cp, "zigzag", comm, ids, True, (20, 0), mode, a2a_size) for mode in MODES
    )
    assert _max_err(packed, per_piece) <= 1e-12 and _max_err(packed, want) <= 1e-12
    assert sum(st.kernel_calls_forward for st in res_pk.stats) < sum(
        st.kernel_calls_forward for st in res_pp.stats
    )


@pytest.mark.parametrize("mask_name", ["docs-causal", "short-docs-window", "docs-bidir-window"])
def test_packed_fp32_within_the_stated_tolerance(mask_name: str) -> None:
    docs, causal, window = MASKS[mask_name]
    cp, s = 4, 96
    ids = _documents(docs, 2, s, seed=6)
    lay = _layout("balanced", ids, cp, causal, window, 2, s)
    q, k, v, dout = _inputs(2, s, torch.float32)
    mask = AttentionMask(causal, window, ids)
    want, single = _dense(q, k, v, dout, mask, torch.float64), _dense(q, k, v, dout, mask, torch.float32)
    (_, per_piece), (_, packed) = (
        _simulate(q, k, v, dout, cp, lay, "p2p", ids, causal, window, m) for m in MODES
    )
    eps = torch.finfo(torch.float32).eps
    for got, ref in zip(packed, per_piece):
        assert _max_err([got], [ref]) <= 4 * eps * ref.abs().max().item()
    assert _max_err(packed, want) <= max(2.5 * _max_err(single, want), 2e-6)


def test_unmasked_steps_are_not_packed_bit_for_bit() -> None:
    """One piece per step (the unmasked schedules): packing would make no fewer calls, so nothing changes."""
    q, k, v, dout = _inputs(1, 64, torch.float32)
    runs = [
        cpd.simulate_context_parallel_attention(q, k, v, 4, grad_out=dout, is_causal=True, piece_packing=m)
        for m in MODES
    ]
    for name in ("out", "dq", "dk", "dv"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name


# ---- what gets packed -----------------------------------------------------------------------------------


def _expected_calls(pieces: tuple[Piece, ...]) -> int:
    classes = {p.kind is not PieceKind.FULL for p in pieces}
    return len(classes) if len(classes) < len(pieces) else len(pieces)


def test_kernel_calls_per_step_pieces_versus_packed() -> None:
    """Each rank's calls per step: per piece = the plan's pieces; packed = one per mask class present."""
    cp, s = 4, 192
    ids = _documents("long", 1, s, seed=1)  # documents of ~19 tokens, a window of 6: bands of three classes
    window = (6, 0)
    lay = cpd.balanced_layout(ids, cp, is_causal=True, window_size=window)
    mask = AttentionMask(True, window, ids)
    q, k, v, dout = _inputs(1, s, torch.float64)
    (res_pp, _), (res_pk, _) = (_simulate(q, k, v, dout, cp, lay, "p2p", ids, True, window, m) for m in MODES)
    for rank in range(cp):
        plan = build_ring_plan_for(lay, mask, rank, cp, s // cp)
        per_step = [(len(pieces), _expected_calls(pieces)) for pieces in plan.pieces]
        assert res_pp.stats[rank].kernel_calls_forward == sum(a for a, _ in per_step)
        assert res_pk.stats[rank].kernel_calls_forward == sum(b for _, b in per_step)
        assert res_pk.stats[rank].kernel_calls_backward == sum(b for _, b in per_step)
        step0 = per_step[0]
        assert step0[0] >= 13 and step0[1] == 2, step0  # 13-15 pieces -> FULL + causal


def test_upper_pieces_pack_as_row_reversed_lower() -> None:
    """An UPPER piece enters the causal call with its query and key rows reversed, and its packed output
    equals the per-piece result (itself computed as LOWER on flipped rows, checked against a dense mask)."""
    pieces = (
        Piece(slice(None), slice(2, 6), slice(1, 5), PieceKind.UPPER),
        Piece(slice(None), slice(6, 9), slice(5, 8), PieceKind.LOWER),
        Piece(slice(None), slice(0, 2), slice(0, 3), PieceKind.FULL),
    )
    kv_rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9])  # the held buffer lacks local row 8
    acc_rows = torch.arange(10)
    step = build_packed_step(pieces, batch=2, kv_rows=kv_rows, acc_rows=acc_rows, device=torch.device("cpu"))
    assert step is not None
    full, causal = step.groups
    assert not full.causal and causal.causal
    # the UPPER piece, batch rows 0 and 1, then the LOWER piece: rows reversed for UPPER only
    assert causal.q_row.tolist() == [5, 4, 3, 2] * 2 + [6, 7, 8] * 2
    assert causal.kv_row.tolist() == [4, 3, 2, 1] * 2 + [5, 6, 7] * 2
    assert causal.q_batch.tolist() == [0] * 4 + [1] * 4 + [0] * 3 + [1] * 3
    assert causal.cu_q.tolist() == causal.cu_k.tolist() == [0, 4, 8, 11, 14]
    assert causal.cu_q.dtype == torch.int32 and (causal.max_q, causal.max_k) == (4, 4)
    assert full.cu_q.tolist() == [0, 2, 4] and full.cu_k.tolist() == [0, 3, 6]
    # numerics: packed forward / backward of these pieces against per piece, fp64
    kernel = KERNELS["cpu_flash"]
    g = torch.Generator().manual_seed(0)
    q, dout = torch.randn(2, 4, 10, 8, generator=g, dtype=torch.float64), None
    k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))  # buffer rows
    for piece in pieces:
        single = Piece(piece.batch, piece.q, piece.kv, piece.kind)
        one = build_packed_step(
            (single, single), batch=2, kv_rows=kv_rows, acc_rows=acc_rows, device=q.device
        )
        assert one is not None  # a piece twice: one call, its rows merged with themselves (lse + log 2)
        out_acc = torch.zeros(q.shape, dtype=torch.float64)
        lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
        packed_forward(kernel, q, k, v, one, 0.3, out_acc, lse_acc)
        rows = slice(int(torch.searchsorted(kv_rows, piece.kv.start)), None)
        rows = slice(rows.start, rows.start + piece.kv.stop - piece.kv.start)
        out, lse = piece_forward(kernel, q, k, v, rows, piece, 0.3)
        assert torch.allclose(out_acc[:, :, piece.q], out, atol=1e-12)
        assert torch.allclose(lse_acc[:, :, piece.q], lse + torch.log(torch.tensor(2.0, dtype=torch.float64)))
        # UPPER really is upper: query row i sees keys i.. (relative), the dense check
        qp, kp, vp = q[:, :, piece.q], k[:, :, rows], v[:, :, rows]
        n_q, n_k = qp.shape[2], kp.shape[2]
        dense = torch.ones(n_q, n_k, dtype=torch.bool)
        if piece.kind is PieceKind.UPPER:
            dense = dense.triu()
        elif piece.kind is PieceKind.LOWER:
            dense = dense.tril()
        ref = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=dense, scale=0.3, enable_gqa=True)
        assert torch.allclose(out, ref, atol=1e-12)
    del dout


def test_packed_backward_scatters_into_the_accumulator_rows() -> None:
    """dq / dK / dV of a packed step equal the per-piece gradients added at the pieces' rows (fp64),
    with accumulator rows different from the held buffer's (a travelling accumulator)."""
    kernel = KERNELS["cpu_flash"]
    pieces = (
        Piece(slice(0, 1), slice(0, 4), slice(2, 6), PieceKind.UPPER),
        Piece(slice(0, 1), slice(1, 4), slice(6, 9), PieceKind.LOWER),  # query rows shared with the first
        Piece(slice(1, 2), slice(0, 4), slice(2, 9), PieceKind.FULL),
    )
    kv_rows = torch.arange(2, 10)  # held: local rows 2..9
    acc_rows = torch.arange(1, 10)  # accumulator: local rows 1..9
    step = build_packed_step(pieces, batch=2, kv_rows=kv_rows, acc_rows=acc_rows, device=torch.device("cpu"))
    assert step is not None
    g = torch.Generator().manual_seed(1)
    q, dout, out = (torch.randn(2, 4, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    lse = torch.randn(2, 4, 4, generator=g, dtype=torch.float64) + 3
    k, v = (torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dq = torch.zeros(q.shape, dtype=torch.float64)
    dk, dv = (torch.zeros(2, 2, 9, 8, dtype=torch.float64) for _ in range(2))
    for grad in packed_backward(kernel, dout, q, k, v, out, lse, step, 0.3, dq):
        grad.add_into(dk, dv)
    want_dq, want_dk, want_dv = torch.zeros_like(dq), torch.zeros_like(dk), torch.zeros_like(dv)
    for p in pieces:
        rows = slice(p.kv.start - 2, p.kv.stop - 2)
        pq, pk, pv = piece_backward(kernel, dout, q, k, v, rows, out, lse, p, 0.3)
        want_dq[p.batch, :, p.q] += pq
        want_dk[p.batch, :, p.kv.start - 1 : p.kv.stop - 1] += pk
        want_dv[p.batch, :, p.kv.start - 1 : p.kv.stop - 1] += pv
    for got, want in ((dq, want_dq), (dk, want_dk), (dv, want_dv)):
        assert (got - want).abs().max().item() <= 1e-12


def test_packed_merge_equals_sequential_lse_merges() -> None:
    """A row in several packed segments: the merge at once equals merge_block_ part by part (fp64)."""
    g = torch.Generator().manual_seed(2)
    step = build_packed_step(
        (
            Piece(slice(None), slice(0, 3), slice(0, 3), PieceKind.LOWER),
            Piece(slice(None), slice(1, 3), slice(3, 5), PieceKind.FULL),
            Piece(slice(None), slice(2, 5), slice(2, 5), PieceKind.UPPER),
        ),
        batch=1,
        kv_rows=None,
        acc_rows=None,
        device=torch.device("cpu"),
    )
    assert step is not None
    total = sum(grp.q_row.numel() for grp in step.groups)
    out_p = torch.randn(total, 2, 4, generator=g, dtype=torch.float64)
    lse_p = torch.randn(total, 2, generator=g, dtype=torch.float64)
    out_acc = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64)
    lse_acc = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    lse_acc[0, :, 4] = float("-inf")  # a row not seen yet (row 5: in no segment, left alone)
    want_out, want_lse = out_acc.clone(), lse_acc.clone()
    rows = torch.cat([grp.q_row for grp in step.groups]).tolist()
    for i, r in enumerate(rows):
        merge_block_(
            want_out[:, :, r : r + 1],
            want_lse[:, :, r : r + 1],
            out_p[i][None, :, None],
            lse_p[i][None, :, None],
        )
    _merge_rows_(out_acc, lse_acc, step, out_p, lse_p)
    assert (out_acc - want_out).abs().max().item() <= 1e-12
    assert (lse_acc - want_lse).abs().max().item() <= 1e-12


def test_packing_is_built_once_per_plan() -> None:
    ids = _documents("short", 1, 64, seed=0)
    plan = build_ring_plan_for("zigzag", AttentionMask(True, (-1, -1), ids), 0, 2, 32)
    cpu = torch.device("cpu")
    assert ring_packing(plan, 1, cpu) is ring_packing(plan, 1, cpu)
    assert ring_packing(plan, 2, cpu) is not ring_packing(plan, 1, cpu)  # per batch size
    gather = build_allgather_plan(plan, rank=0, cp=2, s_local=32)
    assert gather is build_allgather_plan(plan, rank=0, cp=2, s_local=32)  # kept with the ring plan
    assert pieces_packing(gather.cache, gather.pieces, 1, cpu) is pieces_packing(
        gather.cache, gather.pieces, 1, cpu
    )


# ---- the varlen interface's default loop ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CountingMath(MathKernel):
    """The math kernel, counting its dense calls (a list, so the frozen adapter can append)."""

    calls: list = dataclasses.field(default_factory=list, compare=False)

    def forward(self, q, k, v, *, is_causal, scale):
        self.calls.append(("forward", tuple(q.shape)))
        return super().forward(q, k, v, is_causal=is_causal, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, is_causal, scale):
        self.calls.append(("backward", tuple(q.shape)))
        return super().backward(dout, q, k, v, out, lse, is_causal=is_causal, scale=scale)


@pytest.mark.parametrize("is_causal", [False, True])
def test_default_varlen_batches_equal_shapes_and_matches_per_segment_calls(is_causal: bool) -> None:
    lengths = (
        [(3, 5), (4, 4), (3, 5), (1, 1), (4, 4), (3, 5)]
        if not is_causal
        else [(3, 3), (5, 5), (3, 3), (1, 1)]
    )
    cu_q = torch.tensor([0, *torch.tensor([a for a, _ in lengths]).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor([b for _, b in lengths]).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(int(cu_q[-1]), 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(int(cu_k[-1]), 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kernel = _CountingMath()
    mq, mk = max(a for a, _ in lengths), max(b for _, b in lengths)
    out, lse = kernel.varlen_forward(q, k, v, cu_q, cu_k, mq, mk, is_causal=is_causal, scale=0.4)
    dq, dk, dv = kernel.varlen_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, is_causal=is_causal, scale=0.4
    )
    shapes = len(set(lengths))
    assert [c for c, _ in kernel.calls] == ["forward"] * shapes + ["backward"] * shapes
    assert len(equal_shape_batches(cu_q, cu_k)) == shapes
    for i in range(len(lengths)):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])

        def seg(x, lo, hi):
            return x[lo:hi].transpose(0, 1).unsqueeze(0)  # (1, H, L, D)

        o, l_ = MathKernel().forward(seg(q, a, b), seg(k, c, d), seg(v, c, d), is_causal=is_causal, scale=0.4)
        assert (out[a:b] - o[0].transpose(0, 1)).abs().max() <= 1e-12
        assert (lse[a:b] - l_[0].T).abs().max() <= 1e-12
        grads = MathKernel().backward(
            seg(dout, a, b), seg(q, a, b), seg(k, c, d), seg(v, c, d), seg(out, a, b), l_, is_causal=is_causal,
            scale=0.4,
        )  # fmt: skip
        for got, want in zip((dq[a:b], dk[c:d], dv[c:d]), grads):
            assert (got - want[0].transpose(0, 1)).abs().max() <= 1e-12


# ---- the setting ----------------------------------------------------------------------------------------


def test_piece_packing_setting() -> None:
    with pytest.raises(ValueError, match="piece_packing must be one of"):
        cpd.CPSettings(piece_packing="varlen")
    cpu, flash = KERNELS["cpu_flash"], KERNELS["flash"]
    assert not apply_piece_packing(cpu, "auto").pack_pieces  # measured: per piece is faster on CPU
    assert not apply_piece_packing(flash, "auto").pack_pieces  # native varlen, not yet run on a GPU: opt-in
    assert apply_piece_packing(cpu, "packed").pack_pieces
    assert not apply_piece_packing(flash, "per_piece").pack_pieces
    assert apply_piece_packing(cpu, "per_piece") is cpu
    assert not any(k.pack_pieces for k in KERNELS.values())  # the registry's adapters stay as they are
    assert isinstance(apply_piece_packing(cpu, "packed"), AttentionKernel)


def test_the_custom_op_carries_piece_packing() -> None:
    """The compiled path's op takes the setting as its last primitive: packed makes fewer calls."""
    from cp_dtensor.attention.custom_ops import attention_forward

    ids = _documents("short", 1, 48, seed=2)
    q, k, v, _ = _inputs(1, 48, torch.float32)
    counts = {}
    for mode in MODES:
        stats = cpd.AttentionStats()
        primitives = ("", "zigzag", "p2p", 0, "", "auto", True, -1, 0, -1.0, stats.handle, mode)
        attention_forward(q, k, v, ids, None, None, *primitives)
        counts[mode] = stats.kernel_calls_forward
    # one process: a LOWER square per document, a 1 x 1 FULL per one-token document: two calls
    assert counts["packed"] == 2 < counts["per_piece"]


def test_bench_packing_smoke(tmp_path) -> None:
    """scripts/bench_packing.py end to end on a tiny workload (the harness, not timing)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "packing.json"
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "scripts/bench_packing.py", "--seq-len", "4096", "--cp", "4", "--repeats", "1"]
    proc = subprocess.run(
        [*argv, "--json", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [c["window"] for c in report["cases"]] == [[-1, -1], [255, 0]]
    for case in report["cases"]:
        pieces, packed, loop = (sum(step[i] for rank in case["counts"] for step in rank) for i in range(3))
        assert packed <= loop <= pieces and packed < pieces
        assert case["max_abs_diff"] <= 1e-5  # fp32, the two paths' rounding (Note [Piece packing])
