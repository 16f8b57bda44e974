"""DTensor-native CP: the 4-D mesh, SDPA dispatch on sequence-sharded DTensors, batch sharding.

Tolerance: fp32 against an fp64 single-process reference, 1e-5 absolute (inputs N(0, 1); the ring's fp32
block outputs and merge carry ~1e-6 rounding, see test_ring_attention.py). Data movement is exact.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import cached_parallel_dims, cached_world_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import cp_dtensor as cpd
from cp_dtensor.attention.dispatch import ContextParallelAttention
from cp_dtensor.layout import shard_sequence_for_rank
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.sharding import shard_batch, unshard_sequence_output

ATOL = 1e-5


# ---- ParallelDims validation (no process group needed) -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        ({"world_size": 1}, (1, 1, 1, 1)),
        ({"cp": 2, "world_size": 2}, (1, 1, 2, 1)),
        ({"dp": -1, "cp": 2, "world_size": 4}, (1, 2, 2, 1)),
        ({"cp": 2, "tp": 2, "world_size": 4}, (1, 1, 2, 2)),
        ({"pp": 2, "cp": 2, "world_size": 8}, (2, 2, 2, 1)),
        ({"dp": 2, "cp": 2, "tp": 2, "world_size": 8}, (1, 2, 2, 2)),
    ],
)
def test_parallel_dims_infers_dp(kwargs, want) -> None:
    pd = ParallelDims(**kwargs)
    assert (pd.pp, pd.dp, pd.cp, pd.tp) == want
    assert pd.cp_enabled == (want[2] > 1)
    assert pd.dp_cp == want[1] * want[2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"dp": 2, "cp": 2, "world_size": 8},
            r"pp \* dp \* cp \* tp = 1 \* 2 \* 2 \* 1 = 4 does not equal the world size 8",
        ),
        ({"cp": 3, "world_size": 8}, r"world size 8 is not divisible by pp \* cp \* tp = 1 \* 3 \* 1 = 3"),
        ({"cp": 0, "world_size": 8}, r"cp=0 must be an integer >= 1"),
        ({"dp": -2, "world_size": 8}, r"dp=-2 must be an integer >= 1, or -1"),
        ({"cp": 2, "world_size": 2, "cp_layout": "ring"}, r"Unknown sequence layout 'ring'"),
    ],
)
def test_parallel_dims_errors_name_the_numbers(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_seq_len_divisor() -> None:
    assert ParallelDims(cp=2, tp=2, world_size=4).seq_len_divisor == 8
    assert ParallelDims(cp=2, tp=2, world_size=4, cp_layout="contiguous").seq_len_divisor == 4
    assert ParallelDims(tp=2, world_size=2).seq_len_divisor == 2
    with pytest.raises(ValueError, match=r"seq_len=100 must be a multiple of 8 .*use 96 or 104"):
        ParallelDims(cp=2, tp=2, world_size=4).validate_seq_len(100)


# ---- meshes in real process groups -------------------------------------------------------------------


def run_mesh_checks(degree_mixes: list[dict]) -> list[dict]:
    out = []
    for mix in degree_mixes:
        pd = ParallelDims(**mix)
        mesh = pd.build_mesh("cpu")
        out.append(
            {
                "axes": mesh.mesh_dim_names,
                "shape": tuple(mesh.shape),
                "dp_cp": pd.fsdp_mesh.size(),
                "act_axes": pd.activation_mesh.mesh_dim_names,
                "cp_group_ranks": dist.get_process_group_ranks(mesh.get_group("cp")),
                "tp_group_ranks": dist.get_process_group_ranks(mesh.get_group("tp")),
            }
        )
    return out


MESH_MIXES = {
    1: [{}],
    2: [{"cp": 2}, {"tp": 2}, {}],
    4: [{"cp": 2, "tp": 2}, {"pp": 2, "cp": 2}],
    8: [{"dp": 2, "cp": 2, "tp": 2}],
}


@pytest.mark.parametrize("world", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_build_mesh_for_world_sizes(world: int, dist_pool) -> None:
    results = dist_pool(world).run(run_mesh_checks, MESH_MIXES[world])
    for rank, per_rank in enumerate(results):
        for mix, r in zip(MESH_MIXES[world], per_rank):
            pd = ParallelDims(world_size=world, **mix)
            assert r["axes"] == ("pp", "dp", "cp", "tp")
            assert r["shape"] == (pd.pp, pd.dp, pd.cp, pd.tp)  # size-1 axes are kept
            assert r["dp_cp"] == pd.dp * pd.cp
            assert r["act_axes"] == ("cp", "tp")
            # tp is innermost (adjacent ranks), cp next: row-major layout over (pp, dp, cp, tp)
            assert r["tp_group_ranks"] == [rank - rank % pd.tp + i for i in range(pd.tp)]
            cp_base = rank - (rank // pd.tp % pd.cp) * pd.tp
            assert r["cp_group_ranks"] == [cp_base + i * pd.tp for i in range(pd.cp)]


# ---- SDPA dispatch -----------------------------------------------------------------------------------


def _qkv(b: int, hq: int, hkv: int, s: int, d: int, seed: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=g)
        for shape in ((b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d), (b, hq, s, d))
    )


def run_sdpa_dispatch(cp: int, tp: int) -> dict[str, float]:
    """SDPA on DTensors Shard(2) over cp (heads Shard(1) over tp) vs an fp64 reference; max errors."""
    mesh = cached_world_mesh(cp=cp, tp=tp)["cp", "tp"]
    cp_rank, tp_rank = mesh.get_local_rank("cp"), mesh.get_local_rank("tp")
    placements = [Shard(2), Shard(1) if tp > 1 else Replicate()]
    errors = {}
    for (hq, hkv), causal, layout, comm in itertools.product(
        ((4, 4), (4, 2)), (True, False), ("zigzag", "contiguous"), ("p2p", "allgather")
    ):
        q, k, v, dout = _qkv(2, hq, hkv, 16 * cp, 8)
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        ref_out = F.scaled_dot_product_attention(*ref, is_causal=causal, enable_gqa=hq != hkv)
        ref_out.backward(dout.double())

        def local(t: torch.Tensor, layout: str = layout) -> torch.Tensor:
            t = shard_sequence_for_rank(t, cp_rank, cp, 2, layout)
            return t.chunk(tp, dim=1)[tp_rank] if tp > 1 else t

        dts = [
            DTensor.from_local(local(t), mesh, placements, run_check=False).requires_grad_()
            for t in (q, k, v)
        ]
        with ContextParallelAttention(layout=layout, comm=comm):
            out = F.scaled_dot_product_attention(*dts, is_causal=causal, enable_gqa=hq != hkv)
        assert isinstance(out, DTensor) and out.placements == tuple(placements), out
        out.backward(DTensor.from_local(local(dout), mesh, placements, run_check=False))
        key = f"H{hq}/{hkv}-{'causal' if causal else 'bidir'}-{layout}-{comm}"
        got = [out.to_local()] + [t.grad.to_local() for t in dts]
        want = [ref_out.detach()] + [t.grad for t in ref]
        errors[key] = max((g.double() - local(w)).abs().max().item() for g, w in zip(got, want))
    return errors


@pytest.mark.parametrize(("cp", "tp"), [(2, 1), (4, 1), (2, 2)])
def test_sdpa_on_sequence_sharded_dtensors_matches_reference(cp: int, tp: int, dist_pool) -> None:
    for rank_errors in dist_pool(cp * tp).run(run_sdpa_dispatch, cp, tp):
        for key, err in rank_errors.items():
            assert err <= ATOL, f"cp{cp} tp{tp} {key}: max abs err {err:.3g}"


def run_sdpa_dispatch_errors() -> dict[str, str]:
    mesh = cached_world_mesh(cp=dist.get_world_size())["cp", "tp"]
    q = DTensor.from_local(torch.randn(1, 2, 8, 4), mesh, [Shard(2), Replicate()], run_check=False)
    found = {}
    mode = ContextParallelAttention()
    for name, kwargs in {
        "mask": {"attn_mask": torch.ones(16, 16, dtype=torch.bool)},
        "dropout": {"dropout_p": 0.1},
    }.items():
        try:
            with mode:
                F.scaled_dot_product_attention(q, q, q, **kwargs)
            found[name] = "no error"
        except ValueError as e:
            found[name] = str(e)
    # Replicated DTensors are not sequence-sharded: the mode lets them through to DTensor's own path.
    rep = DTensor.from_local(torch.randn(1, 2, 8, 4), mesh, [Replicate(), Replicate()], run_check=False)
    with mode:
        out = F.scaled_dot_product_attention(rep, rep, rep)
    found["replicate_passthrough"] = str(out.placements)
    return found


def test_sdpa_dispatch_rejects_what_it_cannot_serve(dist_pool) -> None:
    found = dist_pool(2).run(run_sdpa_dispatch_errors)[0]
    assert "does not take an explicit attn_mask" in found["mask"]
    assert "does not support attention dropout (dropout_p=0.1)" in found["dropout"]
    assert found["replicate_passthrough"] == "(Replicate(), Replicate())"


# ---- batch sharding ----------------------------------------------------------------------------------


def run_shard_batch(cp: int, tp: int, layout: str) -> bool:
    mesh = cached_world_mesh(cp=cp, tp=tp)["cp", "tp"]
    tokens = torch.arange(3 * 32).view(3, 32)
    batch = shard_batch({"tokens": tokens, "labels": tokens + 1}, mesh, layout=layout)
    ok = set(batch) == {"tokens", "labels", "positions"}
    for t in batch.values():
        ok &= (
            isinstance(t, DTensor)
            and t.placements == (Shard(1), Replicate())
            and t.to_local().shape == (3, 32 // cp)
        )
    # positions follow the permutation: token value = 32 * row + position
    ok &= torch.equal(batch["tokens"].to_local() % 32, batch["positions"].to_local())
    ok &= torch.equal(unshard_sequence_output(batch["tokens"], mesh, layout=layout), tokens)
    ok &= torch.equal(unshard_sequence_output(batch["labels"].to_local(), mesh, layout=layout), tokens + 1)
    return bool(ok)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_batch_positions_follow_the_layout(layout: str, dist_pool) -> None:
    assert all(dist_pool(4).run(run_shard_batch, 2, 2, layout))


def test_public_api_exports() -> None:
    for name in ("shard_sequence", "unshard_sequence", "ring_attention", "ParallelDims", "inspect_sharding"):
        assert hasattr(cpd, name), name


# ---- sharding inspection -----------------------------------------------------------------------------


def run_inspection(cp: int, tp: int) -> dict:
    from cp_dtensor.models.llama import build_llama
    from cp_dtensor.parallelize import parallelize_llama
    from cp_dtensor.sharding_table import inspect_sharding

    pd = cached_parallel_dims(cp=cp, tp=tp)
    model = build_llama("debug")
    model.init_weights(seed=0)
    parallelize_llama(model, pd)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = shard_batch({"tokens": tokens}, pd.batch_mesh)
    records = {r.name: r for r in inspect_sharding(model, batch["tokens"], batch["positions"])}
    blocks = [records[f"layers.{i}"] for i in range(model.args.n_layers)]
    sdpas = [records[f"layers.{i}.attention.sdpa"] for i in range(model.args.n_layers)]

    def t(r):
        return (
            r.is_dtensor,
            r.mesh_axes,
            r.placement_on("cp"),
            r.placement_on("tp"),
            r.local_shape,
            r.global_shape,
        )

    return {
        "root_in": [t(r) for r in records["<root>"].inputs],
        "block_out": [t(r.outputs[0]) for r in blocks],
        "block_in": [t(r.forward_inputs[0]) for r in blocks],
        "sdpa_in": [[t(x) for x in r.forward_inputs] for r in sdpas],
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "wq_param": (
            records["layers.0.attention.wq"].params[0].mesh_axes,
            records["layers.0.attention.wq"].params[0].placements,
        ),
    }


@pytest.mark.parametrize(("cp", "tp"), [(2, 1), (2, 2)])
def test_inspection_shows_sequence_sharded_blocks_and_attention(cp: int, tp: int, dist_pool) -> None:
    for res in dist_pool(cp * tp).run(run_inspection, cp, tp):
        # The trainer's batch: DTensors rows over dp, sequence over cp, replicated over tp.
        for is_dt, axes, on_cp, on_tp, local, global_ in res["root_in"]:
            assert is_dt and axes == ("dp", "cp", "tp") and on_cp == "S(1)" and on_tp == "R"
            assert local == (2, 32 // cp) and global_ == (2, 32)
        # Between blocks the hidden state is a DTensor on ("cp", "tp"), sequence-sharded over cp (and tp).
        for is_dt, axes, on_cp, on_tp, local, global_ in res["block_out"]:
            assert is_dt and axes == ("cp", "tp") and on_cp == "S(1)", res["block_out"]
            assert on_tp == ("S(1)" if tp > 1 else "R")  # sequence parallel over tp
            assert local == (2, 32 // (cp * tp), 64) and global_ == (2, 32, 64)
        # Inside a block tensors are local shards: the first block gets the embedding's local output.
        for is_dt, *_, local, _global in res["block_in"]:
            assert not is_dt and local == (2, 32 // (cp * tp), 64)
        # q, k, v reach SDPA as local shards (layout known to the CP style); only Hkv heads travel.
        for q, k, v, *_ in res["sdpa_in"]:
            assert not q[0] and q[4] == (2, 4 // tp, 32 // cp, 16)
            assert k[4] == v[4] == (2, 2 // tp, 32 // cp, 16)
        # FSDP over dp x cp (and TP over tp) owns the weights; with TP, FSDP shards the already
        # tp-sharded dim 0 again: a strided shard "_S(0, tp)".
        axes, placements = res["wq_param"]
        if tp > 1:
            assert axes == ("dp_cp", "tp") and placements == (f"_S(0, {tp})", "S(0)")
        else:
            assert axes == ("dp_cp",) and placements == ("S(0)",)
