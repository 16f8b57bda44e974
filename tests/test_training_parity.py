"""Loss parity: a few AdamW steps under every mix of CP, TP, FSDP2, PP and AC equal the single-process run.

Setup: the ``debug`` Llama (fp32), the same seed and the same global batch (random tokens, some labels
ignored so that shards hold different token counts), AdamW with weight decay, gradient clipping at 1.0.

Tolerances (reasons): per-step loss within 1e-5 relative - CP changes only the summation order of the
attention softmax and of the gradient reductions (fp32 rounding ~1e-7 per op, a few steps of AdamW);
final weights within 2e-5 absolute - AdamW divides each update by sqrt(v), so a rounding-level gradient
difference moves a weight by at most ~lr x (relative grad difference) per step (lr = 1e-3 here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from dist_harness import cached_parallel_dims

from cp_dtensor.models.llama import build_llama
from cp_dtensor.parallel_dims import ParallelDims
from cp_dtensor.parallelize import build_parallel_model
from cp_dtensor.sharding import shard_batch
from cp_dtensor.train_step import IGNORE_INDEX, train_step

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 2e-5
STEPS = 3


@dataclass(frozen=True)
class Run:
    name: str
    degrees: dict = field(default_factory=dict)
    flavor: str = "debug"
    causal: bool = True
    ac: str = "none"
    layout: str = "zigzag"
    comm: str = "p2p"
    pp_schedule: str = "1F1B"
    seq_len: int = 64
    batch: int = 4

    @property
    def world(self) -> int:
        d = self.degrees
        return d.get("dp", 1) * d.get("cp", 1) * d.get("tp", 1) * d.get("pp", 1)


def _global_batches(run: Run, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(99)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab, (run.batch, run.seq_len + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=g) < 0.3] = IGNORE_INDEX  # uneven token counts per shard
        batches.append({"tokens": tokens[:, :-1].contiguous(), "labels": labels})
    return batches


def _strip(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def train_run(run: Run) -> dict:
    """Train ``run`` on this rank (or single-process when world is 1); losses and full weights."""
    dist_on = run.world > 1
    pd = cached_parallel_dims(**run.degrees) if dist_on else ParallelDims(world_size=1)
    model = build_llama(run.flavor, causal=run.causal)
    model.init_weights(seed=0)
    if dist_on:
        pm = build_parallel_model(
            model,
            pd,
            device=torch.device("cpu"),
            pp_schedule=run.pp_schedule,
            ac_mode=run.ac,
            cp_layout=run.layout,
            cp_comm=run.comm,
        )
        parts, pipeline, loss_mesh = pm.model_parts, pm.pipeline, pd.loss_mesh
    else:
        parts, pipeline, loss_mesh = [model], None, None
    opt = torch.optim.AdamW([p for m in parts for p in m.parameters()], lr=1e-3, weight_decay=0.1)
    losses = []
    for gb in _global_batches(run, model.args.vocab_size):
        if dist_on:
            batch = shard_batch(gb, pd.batch_mesh, layout=run.layout)
        else:
            batch = {**gb, "positions": torch.arange(run.seq_len).expand(run.batch, run.seq_len)}
        res = train_step(parts, [opt], batch, loss_mesh=loss_mesh, pipeline=pipeline, max_norm=1.0)
        losses.append(res.loss)
    weights = {}
    for m in parts:
        for name, p in m.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            weights[_strip(name)] = full.detach().clone()
    return {"losses": losses, "weights": weights}


RUNS = [
    Run("cp2", {"cp": 2}),
    Run("cp2_contiguous", {"cp": 2}, layout="contiguous"),
    Run("cp2_allgather", {"cp": 2}, comm="allgather"),
    Run("cp2_gqa", {"cp": 2}, flavor="debug"),
    Run("cp2_mqa", {"cp": 2}, flavor="debug_mqa"),
    Run("cp2_mha", {"cp": 2}, flavor="debug_mha"),
    Run("cp2_bidirectional", {"cp": 2}, causal=False),
    Run("cp2_full_ac", {"cp": 2}, ac="full"),
    Run("cp2_selective_ac", {"cp": 2}, ac="selective"),
    Run("cp4", {"cp": 4}),
    Run("tp2_cp2", {"cp": 2, "tp": 2}),
    Run("dp2_cp2", {"dp": 2, "cp": 2}),
    Run("pp2_cp2", {"pp": 2, "cp": 2}, flavor="debug_deep"),
    Run("pp2_cp2_gpipe", {"pp": 2, "cp": 2}, flavor="debug_deep", pp_schedule="GPipe"),
    Run("pp2_cp2_interleaved", {"pp": 2, "cp": 2}, flavor="debug_deep", pp_schedule="Interleaved1F1B"),
    Run("dp2_tp2_cp2", {"dp": 2, "cp": 2, "tp": 2}),
]
SLOW = {"dp2_tp2_cp2"}


def _reference(run: Run, cache: dict) -> dict:
    key = (run.flavor, run.causal, run.seq_len, run.batch)
    if key not in cache:
        cache[key] = train_run(Run("single", {}, flavor=run.flavor, causal=run.causal))
    return cache[key]


@pytest.fixture(scope="module")
def reference_cache() -> dict:
    return {}


@pytest.fixture(scope="module")
def parity_table(report_dir):
    rows: list[str] = []
    yield rows
    if report_dir is not None and rows:
        head = "| run | world | max abs loss diff | max rel loss diff | max abs weight diff |\n|---|---|---|---|---|\n"
        (report_dir / "training_parity.md").write_text(
            f"Loss parity vs the single-process run ({STEPS} AdamW steps, fp32)\n\n"
            + head
            + "\n".join(rows)
            + "\n"
        )


@pytest.mark.parametrize(
    "run",
    [pytest.param(r, marks=pytest.mark.slow) if r.name in SLOW else r for r in RUNS],
    ids=lambda r: r.name,
)
def test_training_matches_single_process(run: Run, dist_pool, reference_cache, parity_table) -> None:
    ref = _reference(run, reference_cache)
    per_rank = dist_pool(run.world).run(train_run, run)
    loss_diff = max(abs(a - b) for got in per_rank for a, b in zip(got["losses"], ref["losses"]))
    loss_rel = max(abs(a - b) / abs(b) for got in per_rank for a, b in zip(got["losses"], ref["losses"]))
    weights = {k: v for got in per_rank for k, v in got["weights"].items()}
    weight_diff = max((weights[k] - w).abs().max().item() for k, w in ref["weights"].items() if k in weights)
    parity_table.append(
        f"| {run.name} | {run.world} | {loss_diff:.2e} | {loss_rel:.2e} | {weight_diff:.2e} |"
    )
    for rank, got in enumerate(per_rank):
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
            assert abs(a - b) <= LOSS_RTOL * abs(b), f"{run.name} rank {rank} step {step}: loss {a} vs {b}"
    # Every parameter of the reference exists on some rank (PP splits them) with the same full value.
    seen = {}
    for got in per_rank:
        seen.update(got["weights"])
    assert set(seen) == set(ref["weights"]), set(seen) ^ set(ref["weights"])
    for name, w in ref["weights"].items():
        err = (seen[name] - w).abs().max().item()
        assert err <= WEIGHT_ATOL, f"{run.name}: {name} max abs diff {err:.3g}"
