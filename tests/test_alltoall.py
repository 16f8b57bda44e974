"""All-to-all (Ulysses) and hybrid CP attention: exactness, parity, bytes, saved memory, wiring, errors.

References: single-process SDPA on the full sequence with the dense boolean mask (``AttentionMask.dense``),
GQA heads expanded by SDPA. Tolerances (inputs ~ N(0, 1)), as in test_ring_attention.py and
test_masked_attention.py, for the same reasons:

* fp64 simulation: 1e-12 absolute. The all-to-alls and the group reordering are pure data movement; the
  ring across groups and the masked pieces only reorder fp64 sums.
* fp32 / bf16, multi-process: within RATIO x the error of the single-process SDPA in the same dtype (fp32
  2.5, bf16 3), floors fp32 2e-6 / bf16 4e-3, ceilings fp32 1e-5 / bf16 8e-2. The extra rounding of this
  strategy: a KV head shared by several ranks of a group (fewer KV heads than ranks) gets each rank's dK/dV
  rounded to the input dtype by the kernel, summed in fp32 and rounded again - at most one more bf16
  rounding than the single-process kernel, inside the same RATIO (measured in the report table).
* Bytes: equal to the formula of Note [Ulysses all-to-all] exactly (ints); saved for backward: at most the
  local q, k, v, out and the fp32 lse (B, Hq, S_local).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import cached_world_mesh
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

import cp_dtensor as cpd
from cp_dtensor.attention.alltoall import HeadSplit, build_group_plan
from cp_dtensor.attention.choice import resolve_comm
from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.layout import SequenceLayout, sequence_positions, shard_sequence_for_rank
from cp_dtensor.tools.planner import HARDWARE_PRESETS, AttentionProblem, strategy_estimates

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3}
CEILING = {torch.float32: 1e-5, torch.bfloat16: 8e-2, torch.float64: 1e-12}
RATIO = {torch.float32: 2.5, torch.bfloat16: 3.0}
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1), "gqa8x4": (8, 4)}

# (cp, comm, a2a_size): the plain all-to-all, and hybrids (a2a_size 1 is the ring through this code path).
STRATEGIES_2 = [(2, "alltoall", None), (2, "hybrid", 1), (2, "hybrid", 2)]
STRATEGIES_4 = [(4, "alltoall", None), (4, "hybrid", 2)]


def documents(kind: str, batch: int, seq_len: int, seed: int) -> torch.Tensor | None:
    """(B, S) ids: "none" (no ids), "short" (1-12 tokens), "long" (up to S/2 tokens)."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    top = 12 if kind == "short" else max(2, seq_len // 2)
    ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    for b in range(batch):
        pos, doc = 0, 0
        while pos < seq_len:
            length = int(torch.randint(1, top + 1, (), generator=g))
            ids[b, pos : pos + length] = doc
            pos, doc = pos + length, doc + 1
    return ids


@dataclass(frozen=True)
class MaskCase:
    docs: str
    causal: bool
    window: tuple[int, int] = (-1, -1)

    @property
    def id(self) -> str:
        w = "" if self.window == (-1, -1) else f"-w{self.window[0]}_{self.window[1]}"
        return f"{self.docs}-{'causal' if self.causal else 'bidir'}{w}"


PLAIN = [MaskCase("none", True), MaskCase("none", False)]
MASKED = [
    MaskCase("long", True),
    MaskCase("short", True, (5, 0)),
    MaskCase("long", False, (3, 3)),
    MaskCase("none", True, (40, 0)),
]


def _layout(name: str, ids: torch.Tensor | None, batch: int, s: int, cp: int, mask: MaskCase):
    if name != "balanced":
        return name
    ids = ids if ids is not None else torch.zeros(batch, s, dtype=torch.int64)
    return cpd.balanced_layout(ids, cp, is_causal=mask.causal, window_size=mask.window)


def _inputs(
    batch: int, hq: int, hkv: int, s: int, d: int, dtype: torch.dtype, seed: int
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, hq, s, d), (batch, hkv, s, d), (batch, hkv, s, d), (batch, hq, s, d)]
    return [torch.randn(sh, generator=g).to(dtype) for sh in shapes]


def _reference(q, k, v, dout, mask: AttentionMask, dtype: torch.dtype) -> list[torch.Tensor]:
    """out, dq, dk, dv of single-process SDPA with the dense mask, in ``dtype``."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    dense = mask.dense(q.shape[2]).unsqueeze(1)  # (B or 1, 1, S, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(dout.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- the group plan: runs, super-shard layouts, head routing (pure functions) ----------------------------


@pytest.mark.parametrize(("cp", "a2a_size"), [(2, 2), (4, 4), (4, 2), (4, 1), (8, 2), (8, 4)])
@pytest.mark.parametrize("layout_name", ["zigzag", "contiguous", "balanced"])
def test_group_plan_orders_the_super_shard_by_the_ring_layout(
    cp: int, a2a_size: int, layout_name: str
) -> None:
    """Gathering every member's positions gives the ring layout's positions of the group; scatter inverts."""
    s, batch = 16 * cp, 2
    ids = documents("long", batch, s, seed=cp)
    layout = _layout(layout_name, ids, batch, s, cp, MaskCase("long", True))
    for rank in range(0, cp, a2a_size):
        plan = build_group_plan(layout, cp, a2a_size, rank, s)
        members = range(rank, rank + a2a_size)
        pos = [sequence_positions(s, r, cp, layout).expand(batch, -1) for r in members]  # (B, S_local) each
        slots = torch.stack(pos).view(a2a_size, batch, 1, s // cp, 1).double()  # (k, B, H=1, S_local, D=1)
        gathered = plan.gather(slots)  # (B, 1, k S_local, 1)
        want = sequence_positions(s, plan.index, cp // a2a_size, plan.ring_layout).expand(batch, -1)
        assert torch.equal(gathered[:, 0, :, 0].long(), want), (rank, plan.ring_layout)
        assert torch.equal(plan.scatter(gathered), slots)
        if isinstance(layout, str):
            assert plan.ring_layout == (layout if cp > a2a_size else "contiguous")
        elif cp > a2a_size:
            assert isinstance(plan.ring_layout, SequenceLayout) and plan.ring_layout.cp == cp // a2a_size


@pytest.mark.parametrize(("hq", "hkv", "k"), [(8, 8, 4), (8, 2, 4), (8, 1, 4), (8, 4, 2), (4, 2, 2)])
def test_each_kv_head_goes_only_to_the_ranks_that_use_it(hq: int, hkv: int, k: int) -> None:
    split = HeadSplit(k, hq, hkv)
    index = split.kv_index(torch.device("cpu")).view(k, split.kv_per_rank)
    for member in range(k):
        q_heads = range(member * hq // k, (member + 1) * hq // k)
        used = sorted({h // (hq // hkv) for h in q_heads})  # SDPA's GQA rule
        assert index[member].tolist() == used, (member, index[member].tolist(), used)


# ---- fp64 simulation: exact for every strategy, head layout, layout and mask ------------------------------


SIM_STRATEGIES = [
    (2, "alltoall", None),
    (4, "alltoall", None),
    (4, "hybrid", 2),
    (8, "hybrid", 2),
    (8, "hybrid", 4),
]


def _simulate_and_check(cp, comm, a2a_size, heads, layout_name, mask: MaskCase, s_local: int = 24) -> None:
    hq, hkv = HEADS[heads]
    batch, s = 2, s_local * cp
    ids = documents(mask.docs, batch, s, seed=cp)
    layout = _layout(layout_name, ids, batch, s, cp, mask)
    q, k, v, dout = _inputs(batch, hq, hkv, s, 16, torch.float64, seed=cp + hq + hkv)
    want = _reference(q, k, v, dout, AttentionMask(mask.causal, mask.window, ids), torch.float64)
    res = cpd.simulate_context_parallel_attention(
        q, k, v, cp, grad_out=dout, is_causal=mask.causal, layout=layout, comm=comm, a2a_size=a2a_size,
        document_ids=ids, window_size=mask.window,
    )  # fmt: skip
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (res.out, res.dq, res.dk, res.dv), want):
        err = _max_err(got, ref)
        assert err <= CEILING[torch.float64], (
            f"cp{cp} {comm}/{a2a_size} {heads} {layout_name} {mask.id}: {name} {err}"
        )


@pytest.mark.parametrize(("cp", "comm", "a2a_size"), SIM_STRATEGIES[:3])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout_name", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize("mask", PLAIN, ids=lambda m: m.id)
def test_simulated_alltoall_is_exact_in_fp64(cp, comm, a2a_size, heads, layout_name, mask) -> None:
    _simulate_and_check(cp, comm, a2a_size, heads, layout_name, mask)


@pytest.mark.parametrize(("cp", "comm", "a2a_size"), SIM_STRATEGIES)
@pytest.mark.parametrize("layout_name", ["zigzag", "contiguous", "balanced"])
@pytest.mark.parametrize("mask", MASKED, ids=lambda m: m.id)
def test_simulated_alltoall_with_documents_and_windows_is_exact_in_fp64(
    cp, comm, a2a_size, layout_name, mask
):
    heads = ["mha", "gqa", "mqa"][(cp + len(mask.id) + len(layout_name)) % 3]  # rotate over the grid
    _simulate_and_check(cp, comm, a2a_size, heads, layout_name, mask, s_local=16)


# ---- multi-process: one spawned job per world size ---------------------------------------------------------


@dataclass(frozen=True)
class Case:
    cp: int
    comm: str
    a2a_size: int | None
    layout: str
    mask: MaskCase
    heads: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        strategy = self.comm if self.a2a_size is None else f"{self.comm}{self.a2a_size}"
        dt = str(self.dtype).removeprefix("torch.")
        return f"cp{self.cp}-{strategy}-{self.layout}-{self.mask.id}-{self.heads}-{dt}"


def parity_cases(cp: int) -> list[Case]:
    """CP 2: every strategy x layout x mask x dtype. CP 4 (slow): zigzag and balanced (contiguous is the
    same code with other runs), bf16 only with documents."""
    strategies = STRATEGIES_2 if cp == 2 else STRATEGIES_4
    layouts = ("zigzag", "contiguous", "balanced") if cp == 2 else ("zigzag", "balanced")
    cases = []
    combos = itertools.product(strategies, layouts, [*PLAIN, *MASKED[:3]], (torch.float32, torch.bfloat16))
    for i, ((_, comm, a2a), layout, mask, dtype) in enumerate(combos):
        if cp == 2 or dtype == torch.float32 or mask.docs != "none":
            cases.append(Case(cp, comm, a2a, layout, mask, ["mha", "gqa", "mqa"][i % 3], dtype))
    return cases


def _parity(cases: list[Case], mesh) -> dict[str, dict]:
    """Errors of each case on this rank, and the single-process kernel's error."""
    group = mesh.get_group()
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    batch, s_local = 2, 32
    s = s_local * cp
    results = {}
    for case in cases:
        hq, hkv = HEADS[case.heads]
        ids = documents(case.mask.docs, batch, s, seed=11)
        layout = _layout(case.layout, ids, batch, s, cp, case.mask)
        q, k, v, dout = _inputs(batch, hq, hkv, s, 16, case.dtype, seed=3)
        mask = AttentionMask(case.mask.causal, case.mask.window, ids)
        ref = _reference(q, k, v, dout, mask, torch.float64)
        base = _reference(q, k, v, dout, mask, case.dtype)
        local = [shard_sequence_for_rank(t, rank, cp, 2, layout).requires_grad_() for t in (q, k, v)]
        out = cpd.ring_attention(
            *local, mesh, is_causal=case.mask.causal, layout=layout, comm=case.comm, a2a_size=case.a2a_size,
            document_ids=ids, window_size=case.mask.window,
        )  # fmt: skip
        out.backward(shard_sequence_for_rank(dout, rank, cp, 2, layout))
        got = [out, *(t.grad for t in local)]
        results[case.id] = {
            "dtype": case.dtype,
            "cp": [_max_err(g, shard_sequence_for_rank(r, rank, cp, 2, layout)) for g, r in zip(got, ref)],
            "single": [_max_err(b, r) for b, r in zip(base, ref)],
            "dtypes_ok": all(g.dtype == case.dtype for g in got),
        }
        if case.a2a_size == 1:  # groups of one rank: the ring itself, through this code path
            ring = [t.detach().clone().requires_grad_() for t in local]
            out = cpd.ring_attention(
                *ring, mesh, is_causal=case.mask.causal, layout=layout, comm="p2p", document_ids=ids,
                window_size=case.mask.window,
            )  # fmt: skip
            out.backward(shard_sequence_for_rank(dout, rank, cp, 2, layout))
            results[case.id]["equals_p2p"] = all(
                torch.equal(a, b) for a, b in zip(got, [out, *(t.grad for t in ring)])
            )
    return results


ACC = {"batch": 2, "s_local": 32, "d": 16, "hq": 8}
ACC_KV_HEADS = (8, 2, 1)


def _accounting(strategies: list[tuple[int, str, int | None]], mesh) -> dict[tuple, dict]:
    """Bytes sent forward / backward and bytes saved for backward on this rank, per strategy and KV heads."""
    group = mesh.get_group()
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    b, s_local, d, hq = ACC["batch"], ACC["s_local"], ACC["d"], ACC["hq"]
    out = {}
    for (_, comm, a2a), hkv in itertools.product(strategies, ACC_KV_HEADS):
        q, k, v, dout = _inputs(b, hq, hkv, s_local * cp, d, torch.float32, seed=5)
        local = [shard_sequence_for_rank(t, rank, cp, 2, "zigzag").requires_grad_() for t in (q, k, v)]
        stats = cpd.AttentionStats()
        saved: list[int] = []

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o = cpd.ring_attention(*local, mesh, is_causal=True, comm=comm, a2a_size=a2a, stats=stats)
        o.backward(shard_sequence_for_rank(dout, rank, cp, 2, "zigzag"))
        out[(comm, a2a, hkv)] = {
            "fwd": stats.bytes_sent_forward,
            "bwd": stats.bytes_sent_backward,
            "saved": sum(saved),
            "work": stats.score_elements_forward,
        }
    return out


def expected_bytes(
    cp: int, a2a_size: int, hq: int, hkv: int, batch: int, s_local: int, d: int
) -> tuple[int, int]:
    """Forward and backward bytes per rank, fp32, plain mask (Note [Ulysses all-to-all]; the ring across
    groups: Note [Ring attention, forward and backward] on k-times-longer super-shards)."""
    k, m, e = a2a_size, cp // a2a_size, 4
    kv_heads = max(1, hkv // k)  # KV heads per member: only those its query heads use
    q_local = batch * hq * s_local * d * e
    a2a_q = (k - 1) * q_local // k  # q, out, dout, dq: (k - 1) of k head slots leave the rank
    a2a_kv = (k - 1) * batch * kv_heads * s_local * d * e  # k or v: one slot per other member
    ring_kv = (m - 1) * 2 * batch * kv_heads * k * s_local * d * e  # K and V super-shards, m - 1 hops
    forward = a2a_q + 2 * a2a_kv + ring_kv + a2a_q  # q, k, v to heads; out back
    backward = 3 * a2a_q + 2 * a2a_kv + 2 * ring_kv + a2a_q + 2 * a2a_kv  # q, out, dout, k, v; ring KV and
    return forward, backward  # fp32 dK/dV; dq, dk, dv back


def _wiring(mesh) -> dict[str, object]:
    """The mode, the style and DTensor dispatch pass comm / a2a_size through; ranks that disagree raise."""
    group = mesh.get_group()
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, _ = _inputs(1, 4, 2, 16 * cp, 8, torch.float32, seed=9)
    local = [shard_sequence_for_rank(t, rank, cp, 2, "zigzag") for t in (q, k, v)]
    direct = cpd.ring_attention(*local, mesh, is_causal=True, comm="hybrid", a2a_size=cp)
    found: dict[str, object] = {}
    with ContextParallelAttention(mesh, layout="zigzag", comm="hybrid", a2a_size=cp):
        found["mode_equal"] = torch.equal(
            F.scaled_dot_product_attention(*local, is_causal=True, enable_gqa=True), direct
        )

    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    style = cpd.ContextParallel(layout="zigzag", comm="hybrid", a2a_size=cp)
    module = parallelize_module(Attention(), mesh, style)
    found["style_equal"] = torch.equal(module(*local), direct)
    found["style_repr"] = repr(style)
    dq, dk, dv = (distribute_tensor(t, mesh, [Shard(2)]) for t in (q, k, v))
    with ContextParallelAttention(comm="alltoall"):
        dt_out = F.scaled_dot_product_attention(dq, dk, dv, is_causal=True, enable_gqa=True)
    found["dtensor"] = isinstance(dt_out, DTensor)
    # comm="auto": the op resolves the cost model's choice per shape, the same on every rank
    resolved = resolve_comm("auto", None, local[0], local[1], cp, True)
    stats_auto, stats_named = cpd.AttentionStats(), cpd.AttentionStats()
    with ContextParallelAttention(mesh, layout="zigzag", comm="auto", stats=stats_auto):
        auto_out = F.scaled_dot_product_attention(*local, is_causal=True, enable_gqa=True)
    named = cpd.ring_attention(
        *local, mesh, is_causal=True, comm=resolved[0], a2a_size=resolved[1], stats=stats_named
    )
    traffic = lambda st: (st.bytes_sent_forward, st.score_elements_forward, st.kernel_calls_forward)  # noqa: E731
    found["auto_equal"] = torch.equal(auto_out, named) and traffic(stats_auto) == traffic(stats_named)
    found["auto_resolved"] = resolved
    found["dtensor_err"] = _max_err(
        dt_out.full_tensor(), _reference(q, k, v, torch.zeros_like(q), AttentionMask(True), torch.float64)[0]
    )

    def error_of(fn) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no error"

    # Shapes no earlier call used, so neither rank has this signature cached (Note [Cross-rank call check]).
    fresh = [t[:, :, :4].contiguous() for t in local]
    found["a2a_mismatch"] = error_of(
        lambda: cpd.ring_attention(
            *fresh, mesh, is_causal=True, comm="hybrid", a2a_size=1 if rank == 0 else cp
        )
    )
    odd = [torch.randn(1, 3, 8, 8) for _ in range(3)]
    found["odd_heads"] = error_of(lambda: cpd.ring_attention(*odd, mesh, comm="alltoall"))
    return found


def run_world(cp: int, with_wiring: bool) -> dict[str, object]:
    """Everything the multi-process tests need at one CP size, in one job of the pool."""
    mesh = cached_world_mesh(cp=cp)["cp"]
    strategies = STRATEGIES_2 if cp == 2 else STRATEGIES_4
    result: dict[str, object] = {
        "parity": _parity(parity_cases(cp), mesh),
        "accounting": _accounting(strategies, mesh),
    }
    if with_wiring:
        result["wiring"] = _wiring(mesh)
    return result


@pytest.fixture(scope="module")
def world(dist_pool, report_dir):
    cache: dict[int, list[dict]] = {}

    def get(cp: int) -> list[dict]:
        if cp not in cache:
            cache[cp] = dist_pool(cp).run(run_world, cp, cp == 2, timeout_s=900)
        return cache[cp]

    yield get
    if report_dir is not None and cache:
        rows = [
            "| case | out | dq | dk | dv | single-process out / dq / dk / dv |",
            "|---|---|---|---|---|---|",
        ]
        for per_rank in cache.values():
            for cid in per_rank[0]["parity"]:
                err = [max(r["parity"][cid]["cp"][i] for r in per_rank) for i in range(4)]
                single = " / ".join(f"{e:.1e}" for e in per_rank[0]["parity"][cid]["single"])
                rows.append(f"| {cid} | " + " | ".join(f"{e:.1e}" for e in err) + f" | {single} |")
        (report_dir / "alltoall_errors.md").write_text(
            "Max abs error vs fp64 single-process SDPA (all-to-all / hybrid CP, multi-process gloo)\n\n"
            + "\n".join(rows)
            + "\n"
        )


CP_SIZES = [2, pytest.param(4, marks=pytest.mark.slow)]


@pytest.mark.parametrize("cp", CP_SIZES)
def test_alltoall_and_hybrid_match_single_process_sdpa(cp: int, world) -> None:
    for per_rank in world(cp):
        for cid, res in per_rank["parity"].items():
            assert res["dtypes_ok"], f"{cid}: outputs and gradients must keep the input dtype"
            if "equals_p2p" in res:  # a2a_size 1: bit for bit the ring, whose bounds test_masked_attention
                assert res["equals_p2p"], cid  # and test_ring_attention check
                continue
            dtype = res["dtype"]
            for name, e_cp, e_single in zip(("out", "dq", "dk", "dv"), res["cp"], res["single"]):
                bound = min(max(RATIO[dtype] * e_single, FLOOR[dtype]), CEILING[dtype])
                assert e_cp <= bound, (
                    f"{cid}: {name} {e_cp:.3g} > {bound:.3g} (single-process {e_single:.3g})"
                )


@pytest.mark.parametrize("cp", CP_SIZES)
def test_bytes_sent_per_rank_equal_the_formula(cp: int, world) -> None:
    b, s_local, d, hq = ACC["batch"], ACC["s_local"], ACC["d"], ACC["hq"]
    for per_rank in world(cp):
        for (comm, a2a, hkv), r in per_rank["accounting"].items():
            size = cp if comm == "alltoall" else a2a
            want = expected_bytes(cp, size, hq, hkv, b, s_local, d)
            assert (r["fwd"], r["bwd"]) == want, (comm, a2a, hkv, (r["fwd"], r["bwd"]), want)
            # the planner's cost model (comm="auto") prices exactly these bytes (a2a_size 1: the p2p ring)
            problem = AttentionProblem(hq, hkv, d, s_local * cp, cp, micro_batch=b, dtype_bytes=4)
            rows = strategy_estimates(problem, HARDWARE_PRESETS["h100"])
            priced = next(e for e in rows if e.a2a_size == size or (size == 1 and e.comm == "p2p"))
            assert (priced.forward_bytes, priced.backward_bytes) == want, (comm, a2a, hkv, priced)


@pytest.mark.parametrize("cp", CP_SIZES)
def test_only_local_shards_are_saved_for_backward(cp: int, world) -> None:
    b, s_local, d, hq = ACC["batch"], ACC["s_local"], ACC["d"], ACC["hq"]
    for per_rank in world(cp):
        for (comm, a2a, hkv), r in per_rank["accounting"].items():
            local = (2 * b * hq * s_local * d + 2 * b * hkv * s_local * d) * 4  # q, out; k, v (fp32)
            lse = b * hq * s_local * 4
            assert r["saved"] <= local + lse, (comm, a2a, hkv, r["saved"], local + lse)


@pytest.mark.parametrize("cp", CP_SIZES)
def test_causal_work_adds_up_to_the_visible_pairs(cp: int, world) -> None:
    """The local heads over the whole sequence (alltoall) or the zigzag ring of super-shards (hybrid): every
    visible pair once, no masked score computed."""
    b, s = ACC["batch"], ACC["s_local"] * cp
    for comm, a2a, hkv in world(cp)[0]["accounting"]:
        work = [r["accounting"][(comm, a2a, hkv)]["work"] for r in world(cp)]
        assert sum(work) == b * ACC["hq"] * s * (s + 1) // 2, (comm, a2a, hkv, work)
        assert max(work) == min(work), (comm, a2a, hkv, work)  # zigzag super-shards: balanced


def test_mode_style_and_dtensor_dispatch_pass_comm_and_a2a_size_through(world) -> None:
    for found in (r["wiring"] for r in world(2)):
        assert found["mode_equal"] and found["style_equal"], found
        assert "a2a_size=2" in found["style_repr"], found
        assert found["dtensor"] and found["dtensor_err"] <= CEILING[torch.float32], found
        assert found["auto_equal"] and found["auto_resolved"][0] in ("p2p", "allgather", "alltoall"), found


def test_ranks_that_disagree_on_a2a_size_or_cannot_split_heads_raise_on_every_rank(world) -> None:
    for found in (r["wiring"] for r in world(2)):
        assert "a2a_size (rank 0: 1, rank 1: 2)" in found["a2a_mismatch"], found
        assert "3 query heads and 3 key/value heads" in found["odd_heads"], found


# ---- composition: heads split over tp, CP groups that are part of a larger world --------------------------


def run_tp_alltoall() -> list[float]:
    """cp 2 x tp 2: heads Shard(1) over tp, then all-to-all over cp on the 4 / 1 local query / KV heads."""
    mesh = cached_world_mesh(cp=2, tp=2)["cp", "tp"]
    q, k, v, dout = _inputs(1, 8, 2, 64, 8, torch.float32, seed=4)
    ref = _reference(q, k, v, dout, AttentionMask(True), torch.float64)
    dq, dk, dv = (distribute_tensor(t, mesh, [Shard(2), Shard(1)]).requires_grad_() for t in (q, k, v))
    with ContextParallelAttention(comm="alltoall"):
        out = F.scaled_dot_product_attention(dq, dk, dv, is_causal=True, enable_gqa=True)
    out.backward(distribute_tensor(dout, mesh, [Shard(2), Shard(1)]))
    return [_max_err(t.full_tensor(), r) for t, r in zip((out, dq.grad, dk.grad, dv.grad), ref)]


@pytest.mark.slow
def test_alltoall_under_tensor_parallel_heads(dist_pool) -> None:
    for errs in dist_pool(4).run(run_tp_alltoall):
        assert max(errs) <= CEILING[torch.float32], errs


def run_hybrid_in_dp_world() -> list[float]:
    """dp 2 x cp 4: each CP group creates its own hybrid subgroups (local synchronization)."""
    mesh = cached_world_mesh(dp=2, cp=4)["cp"]
    case = Case(4, "hybrid", 2, "zigzag", MaskCase("long", True), "gqa", torch.float32)
    res = _parity(
        [case, Case(4, "hybrid", 2, "balanced", MaskCase("short", True, (5, 0)), "mqa", torch.float32)], mesh
    )
    return [max(r["cp"]) for r in res.values()]


@pytest.mark.slow
def test_hybrid_subgroups_of_one_cp_group_among_several(dist_pool) -> None:
    for errs in dist_pool(8).run(run_hybrid_in_dp_world):
        assert max(errs) <= CEILING[torch.float32], errs


# ---- bad input: clear errors before any communication -----------------------------------------------------


@pytest.mark.parametrize(
    ("heads", "cp", "kwargs", "match"),
    [
        ((6, 6), 4, {"comm": "alltoall"}, r"over 4 ranks \(the CP degree 4\).*6 query heads and 6 key/value"),
        (
            (12, 3),
            4,
            {"comm": "alltoall"},
            r"12 query heads and 3 key/value heads.*must divide 4 or be a multiple",
        ),
        ((6, 2), 4, {"comm": "hybrid", "a2a_size": 4}, r"a2a_size=4 \(CP degree 4\).*6 query heads"),
        ((4, 4), 4, {"comm": "hybrid"}, r"comm='hybrid' needs a2a_size=k.*divide the CP degree"),
        (
            (4, 4),
            4,
            {"comm": "hybrid", "a2a_size": 3},
            r"a2a_size=3 must be a positive divisor of the CP degree 4",
        ),
        ((4, 4), 4, {"comm": "hybrid", "a2a_size": 0}, r"a2a_size=0 must be a positive divisor"),
        ((4, 4), 4, {"comm": "p2p", "a2a_size": 2}, r"a2a_size=2 is only used with comm='hybrid'"),
        ((4, 4), 2, {"comm": "ulysses"}, r"Unknown CP comm mode 'ulysses'.*'alltoall', 'hybrid'"),
    ],
)
def test_bad_heads_and_a2a_size_are_refused(heads, cp, kwargs, match) -> None:
    hq, hkv = heads
    q, k, v, _ = _inputs(1, hq, hkv, 8 * cp, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match=match):
        cpd.simulate_context_parallel_attention(q, k, v, cp, is_causal=True, **kwargs)


def test_mode_refuses_hybrid_without_a2a_size() -> None:
    with pytest.raises(ValueError, match="comm='hybrid' needs a2a_size"):
        ContextParallelAttention(comm="hybrid")
    with pytest.raises(ValueError, match="Unknown CP comm mode"):
        ContextParallelAttention(comm="ulysses")
    with pytest.raises(ValueError, match="with comm='auto': the cost model chooses the group size"):
        ContextParallelAttention(comm="auto", a2a_size=2)
    assert ContextParallelAttention(comm="auto").settings.comm == "auto"
    assert ContextParallelAttention(comm="hybrid", a2a_size=2).settings.a2a_size == 2
