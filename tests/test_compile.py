"""torch.compile under CP: the attention custom ops, one graph per block, no recompiles, eager parity.

Tolerances: losses and gradient norms equal to 1e-6 relative over 3 AdamW steps for both backends.
``aot_eager`` runs the very ops eager runs, in the same order (fp32 rounding of the optimizer's fused ops
at most). ``inductor`` fuses the elementwise code around attention (norms, rotary, SwiGLU) but keeps its
reductions' order on this CPU build: measured bit-equal (relative difference 0.0) on torch 2.13, so 1e-6
leaves room for reassociation only. The former 1e-4 let a swap of dK and dV pass (the swap keeps the
gradient norm and moves the step-3 loss by ~1e-5; issue 25 item 15).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import cached_parallel_dims

import cp_dtensor as cpd
from cp_dtensor.attention.custom_ops import attention_backward, attention_forward
from cp_dtensor.models.llama import build_llama
from cp_dtensor.parallelize import build_parallel_model
from cp_dtensor.sharding import shard_batch
from cp_dtensor.train_step import train_step

STEPS = 3


def _op_args(docs: bool) -> tuple:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, generator=g, requires_grad=True) for _ in range(2))
    ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 16]) if docs else None
    # OpCall primitives: group "" (one process), layout, comm, a2a_size, backend, cost hardware, is_causal,
    # window (left, right), scale, stats handle
    settings = ("", "zigzag", "p2p", 0, "", "auto", True, 3 if docs else -1, 0, 0.35, 0)
    return q, k, v, ids, settings


@pytest.mark.parametrize("docs", [False, True])
def test_custom_ops_pass_opcheck(docs: bool) -> None:
    """Schema, fake (meta) implementation, autograd registration: torch.library.opcheck's checks. (Its
    dynamic-shape AOT test differentiates the backward op too; the ring's backward is not differentiable,
    and says so, so that one test is left out.)"""
    q, k, v, ids, settings = _op_args(docs)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(attention_forward, (q, k, v, ids, None, None, *settings), test_utils=checks)
    out, lse = attention_forward(q, k, v, ids, None, None, *settings)
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), ids, None, *settings)
    torch.library.opcheck(attention_backward, args, test_utils=checks)


def test_fake_implementations_give_shapes_and_dtypes() -> None:
    """The fake kernels match the real ones: out like q (contiguous), lse (B, Hq, S_local) fp32, grads like q, k, v."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, ids, settings = _op_args(False)
        q, k, v = (t.detach().to(dtype).transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        real_out, real_lse = attention_forward(q, k, v, ids, None, None, *settings)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake_out, fake_lse = attention_forward(q, k, v, ids, None, None, *settings)
            fake_grads = attention_backward(fake_out, q, k, v, fake_out, fake_lse, ids, None, *settings)
        for real, fake in ((real_out, fake_out), (real_lse, fake_lse)):
            assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
        assert real_lse.dtype == torch.float32
        for grad, like in zip(fake_grads, (q, k, v)):
            assert grad.shape == like.shape and grad.dtype == like.dtype


def run_compiled_training(degrees: dict, backend: str, docs: bool, flavor: str) -> dict:
    """3 AdamW steps eager and compiled on this rank: losses, graph counts, and recompiles after step 1."""
    import torch._dynamo

    pd = cached_parallel_dims(**degrees)
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 512, (2, 65), generator=g)
        batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if docs:
            ids = torch.zeros(2, 64, dtype=torch.int64)
            ids[0, 13:], ids[0, 40:], ids[1, 30:] = 1, 2, 1
            batch["document_ids"] = ids
        batches.append(batch)
    layout = cpd.BalancedLayoutRule() if docs else "zigzag"
    losses, norms = {}, {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = build_llama(flavor)
        model.init_weights(seed=0)
        pm = build_parallel_model(
            model, pd, device=torch.device("cpu"), cp_settings=cpd.CPSettings(layout=layout),
            compile_backend=backend if mode == "compiled" else None,
        )  # fmt: skip
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
        run = []
        for step, gb in enumerate(batches):
            if mode == "compiled" and step == 1:
                torch._dynamo.config.error_on_recompile = True  # steps 2+ must reuse step 1's graphs
            b = shard_batch(gb, pd.batch_mesh, layout=layout(gb["document_ids"], pd.cp) if docs else layout)
            res = train_step(pm.model_parts, [opt], b, loss_mesh=pd.loss_mesh, pipeline=pm.pipeline)
            run.append(res.loss)
            norms.setdefault(mode, []).append(res.grad_norm)
        torch._dynamo.config.error_on_recompile = False
        losses[mode] = run
        if mode == "compiled":
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    blocks = sum(len(part.layers) for part in pm.model_parts)
    return {
        "losses": losses, "norms": norms, "graphs": graphs, "breaks": breaks, "blocks": blocks,
        "rank": dist.get_rank(),
    }  # fmt: skip


CASES = [
    ("cp2_inductor", {"cp": 2}, "inductor", False, "debug"),
    ("cp2_documents", {"cp": 2}, "aot_eager", True, "debug"),
    ("dp2_cp2", {"dp": 2, "cp": 2}, "aot_eager", False, "debug"),
    ("pp2_cp2", {"pp": 2, "cp": 2}, "aot_eager", False, "debug_deep"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_compiled_training_matches_eager_without_recompiles(case: tuple, dist_pool) -> None:
    name, degrees, backend, docs, flavor = case
    world = 1
    for d in degrees.values():
        world *= d
    rtol = 1e-6  # see the module docstring
    for res in dist_pool(world).run(run_compiled_training, degrees, backend, docs, flavor, timeout_s=900):
        for step, (a, b) in enumerate(zip(res["losses"]["eager"], res["losses"]["compiled"])):
            assert abs(a - b) <= rtol * abs(a), f"{name} rank {res['rank']} step {step}: {a} vs {b}"
        # gradient norms too: a compiled block that dropped its input's gradient keeps the loss of step 1
        for step, (a, b) in enumerate(zip(res["norms"]["eager"], res["norms"]["compiled"])):
            assert abs(a - b) <= rtol * abs(a), f"{name} rank {res['rank']} step {step}: grad norm {a} vs {b}"
        assert res["breaks"] == 0, f"{name}: {res['breaks']} graph breaks"
        # compiled at step 1 only (error_on_recompile after it); a bounded number of frames per block
        assert 1 <= res["graphs"] <= 2 * res["blocks"], (
            f"{name}: {res['graphs']} graphs, {res['blocks']} blocks"
        )


def run_compiled_auto_comm() -> dict:
    """ring_attention(comm="auto") compiled with fullgraph: the choice resolves at trace time (a constant)."""
    from cp_dtensor.attention.choice import resolve_comm
    from cp_dtensor.layout import shard_sequence_for_rank

    rank, cp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 64, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    local = [shard_sequence_for_rank(t, rank, cp, 2, "zigzag") for t in (q, k, v)]
    comm, a2a = resolve_comm("auto", None, local[0], local[1], cp, True)
    named = cpd.ring_attention(*local, dist.group.WORLD, is_causal=True, comm=comm, a2a_size=a2a)
    compiled = torch.compile(
        lambda a, b, c: cpd.ring_attention(a, b, c, dist.group.WORLD, is_causal=True, comm="auto"),
        backend="aot_eager",
        fullgraph=True,
    )
    return {"equal": torch.equal(compiled(*local), named), "comm": comm}


def test_compiled_auto_comm_equals_the_named_choice(dist_pool) -> None:
    for found in dist_pool(2).run(run_compiled_auto_comm):
        assert found["equal"], found
