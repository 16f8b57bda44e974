"""Tests of the analytic cost model (cp_dtensor/tools/planner/) and of scripts/plan.py; fast, no distributed.

Each test checks one property of Note [Cost model]: a formula (CP bytes, causal FLOPs, PP bubble), a
scaling law (activation memory ~ 1/cp and ~ 1/tp, full recompute), the recommender's contract (only
plans that fit), and the seed's claim on its own model (175B GPT, Figure 2) as this model prices it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch

from cp_dtensor.memory import count_saved_tensors
from cp_dtensor.models.llama import LLAMA3_FLAVORS, build_llama, count_params
from cp_dtensor.models.llama import model_flops_per_token as llama_flops_per_token
from cp_dtensor.models.modules import Transformer
from cp_dtensor.models.qwen3 import QWEN3_FLAVORS
from cp_dtensor.parallelize import apply_ac
from cp_dtensor.pipeline import _split_layers, stage_ids_for_rank, stages_per_rank
from cp_dtensor.tools.planner import (
    GIB,
    GPT_175B,
    CostOptions,
    ModelShape,
    ParallelPlan,
    activation_bytes_per_token_layer,
    attention_flops,
    build_hardware,
    build_model_shape,
    compare_measurements,
    cp_comm_bytes,
    enumerate_plans,
    estimate,
    load_calibration,
    model_flops_per_token,
    plan_problem,
    pp_bubble_fraction,
    recommend,
)
from cp_dtensor.tools.planner.formulas import ring_transient_bytes
from cp_dtensor.tools.planner.parallel_plan import split_stages
from cp_dtensor.train_step import token_loss_sum

ROOT = Path(__file__).resolve().parent.parent
H100 = build_hardware("h100")
LLAMA_8B = build_model_shape("llama3_8b")


def _load_plan_script() -> ModuleType:
    """Import ``scripts/plan.py`` as a module."""
    spec = importlib.util.spec_from_file_location("plan_script", ROOT / "scripts" / "plan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_script"] = module
    spec.loader.exec_module(module)
    return module


# ---- model shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["debug", "small", "debug_mqa"])
def test_shape_from_flavor_counts_the_real_parameters(flavor: str) -> None:
    """ModelShape.from_flavor describes the same parameters as the Llama module it mirrors."""
    assert build_model_shape(flavor).params == count_params(build_llama(flavor))


@pytest.mark.parametrize("flavor", ["debug", "debug_tied", "0.6B", "8B"])
def test_qwen3_shape_counts_the_real_parameters_and_flops(flavor: str) -> None:
    """Qwen3's explicit head size (0.6B: 128 with dim 1024 / 16 heads, not 64), q/k norms and tied embeddings:
    the planner's shape has the built model's parameters (meta device) and the trainer's FLOPs per token."""
    with torch.device("meta"):
        model = Transformer(QWEN3_FLAVORS[flavor])
    shape = build_model_shape(f"qwen3_{flavor}")
    assert shape.head_dim == QWEN3_FLAVORS[flavor].head_dim
    assert shape.params == count_params(model)
    for seq in (1024, 131072):
        assert model_flops_per_token(shape, seq) == llama_flops_per_token(QWEN3_FLAVORS[flavor], seq)


def test_gpt175b_preset_has_175b_parameters() -> None:
    """12 * h^2 * L + V * h (tied) = 174.6e9 for the seed's model."""
    assert GPT_175B.params == pytest.approx(174.6e9, rel=1e-3)
    assert GPT_175B.mlp_matrices == 2 and GPT_175B.n_kv_heads == GPT_175B.n_heads


# ---- formulas ----------------------------------------------------------------------------------------


def test_causal_attention_flops_are_half_of_bidirectional() -> None:
    """Causal attention computes the lower triangle: exactly half of the bidirectional FLOPs."""
    s = 32768
    assert attention_flops(LLAMA_8B, s, causal=True) * 2 == attention_flops(LLAMA_8B, s, causal=False)
    # 4 * hd * a * S^2 / 2 for one sequence and one layer
    assert attention_flops(LLAMA_8B, s) == 4 * 128 * 32 * s * s / 2


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_splits_causal_work_exactly_and_contiguous_does_not(cp: int) -> None:
    """Zigzag: each rank does 1/cp of the causal work; contiguous: the last rank does (2cp-1)/cp of its share."""
    s, full = 65536, attention_flops(LLAMA_8B, 65536)
    assert attention_flops(LLAMA_8B, s, cp=cp, cp_layout="zigzag") * cp == pytest.approx(full, rel=1e-12)
    contiguous = attention_flops(LLAMA_8B, s, cp=cp, cp_layout="contiguous")
    assert contiguous * cp / full == pytest.approx((2 * cp - 1) / cp, rel=1e-12)


def test_cp_comm_bytes_count_only_kv_heads() -> None:
    """GQA: the ring moves the 8 KV heads of Llama 3 8B, not its 32 query heads; backward adds fp32 dK/dV."""
    s, cp, tp = 131072, 4, 2
    fwd, bwd = cp_comm_bytes(LLAMA_8B, s, cp, tp=tp, dtype_bytes=2, grad_bytes=4)
    kv_heads_per_rank, head_dim = 8 // tp, 128
    assert fwd == (cp - 1) * 2 * (s // cp) * kv_heads_per_rank * head_dim * 2
    assert bwd == (cp - 1) * 2 * (s // cp) * kv_heads_per_rank * head_dim * (2 + 4)
    mha = ModelShape(**{**LLAMA_8B.__dict__, "n_kv_heads": 32})
    assert cp_comm_bytes(mha, s, cp, tp=tp)[0] == 4 * fwd  # 4x the KV heads, 4x the bytes
    assert cp_comm_bytes(LLAMA_8B, s, 1) == (0.0, 0.0)


@pytest.mark.parametrize(("pp", "m"), [(1, 1), (2, 1), (4, 12), (8, 8)])
def test_pp_bubble_formula_and_estimate(pp: int, m: int) -> None:
    """Bubble fraction (pp-1)/(m+pp-1), and the estimate's bubble is that fraction of its step."""
    assert pp_bubble_fraction(pp, m) == (pp - 1) / (m + pp - 1)
    # dp = cp = 1: no FSDP term, so the step is exactly the 1F1B pipeline
    est = estimate(LLAMA_8B, ParallelPlan(tp=8, pp=pp, ac="full"), 8192, H100, microbatches=m)
    assert est.fsdp_exposed_s == 0
    assert est.pp_bubble_s / est.step_time_s == pytest.approx(pp_bubble_fraction(pp, m), rel=1e-12)


def test_planner_flops_per_token_is_llamas() -> None:
    """One formula: the planner's MFU numerator equals cp_dtensor.models.llama.model_flops_per_token."""
    for flavor in ("debug_mqa", "small", "8B", "70B"):
        for seq in (1024, 131072):
            planner = model_flops_per_token(build_model_shape(flavor), seq)
            assert planner == llama_flops_per_token(LLAMA3_FLAVORS[flavor], seq), (flavor, seq)


# ---- pipeline stages (the split of cp_dtensor.pipeline) ------------------------------------------------


@pytest.mark.parametrize(
    ("n_layers", "pp", "schedule"),
    [(32, 3, "1F1B"), (10, 4, "1F1B"), (96, 64, "GPipe"), (32, 4, "1F1B"), (10, 2, "Interleaved1F1B")],
)
def test_stage_split_prices_the_largest_stage_of_the_pipeline_split(
    n_layers: int, pp: int, schedule: str
) -> None:
    """The planner prices the largest stage ``cp_dtensor.pipeline`` builds; its rank bounds the busiest rank."""
    split = split_stages(n_layers, pp, schedule)
    per_rank = stages_per_rank(schedule)
    stages = _split_layers(n_layers, pp * per_rank)
    assert split.stages == len(stages) and split.stages_per_rank == per_rank
    assert split.stage_layers == max(len(s) for s in stages)
    busiest = max(sum(len(stages[i]) for i in stage_ids_for_rank(r, pp, per_rank)) for r in range(pp))
    assert busiest <= split.rank_layers < busiest + per_rank


def test_uneven_pipeline_split_is_accepted_and_priced_by_its_largest_stage() -> None:
    """pp 3 on 32 layers runs (stages of 11, 11, 10 blocks) and costs what 3 stages of 11 blocks cost."""
    plan = ParallelPlan(tp=8, pp=3, ac="full")
    assert plan_problem(LLAMA_8B, plan, 8192) is None
    uneven = estimate(LLAMA_8B, plan, 8192, H100, microbatches=4)
    even = estimate(replace(LLAMA_8B, n_layers=33), plan, 8192, H100, microbatches=4)
    assert uneven.fits and not uneven.reason
    assert uneven.step_time_s == even.step_time_s and uneven.peak_bytes == even.peak_bytes
    # the planner proposes it too: pp 3 of 12 devices
    assert any(p.pp == 3 for p in enumerate_plans(LLAMA_8B, 8192, 12, H100))


def test_pipeline_with_more_stages_than_layers_is_rejected() -> None:
    """pp x stages per rank must not exceed the layers (4 for the small model); only that is rejected."""
    small = build_model_shape("small")
    assert plan_problem(small, ParallelPlan(pp=3), 1024) is None  # 2 + 1 + 1 blocks
    problem = plan_problem(small, ParallelPlan(pp=5), 1024)
    assert problem is not None and "5 pipeline stages exceeds n_layers 4" in problem
    est = estimate(small, ParallelPlan(pp=5), 1024, H100)
    assert not est.fits and est.reason == problem
    # an interleaved schedule holds 2 stages per rank: pp 2 makes 4 stages, pp 3 makes 6
    assert plan_problem(small, ParallelPlan(pp=2), 1024, pp_schedule="Interleaved1F1B") is None
    interleaved = plan_problem(small, ParallelPlan(pp=3), 1024, pp_schedule="Interleaved1F1B")
    assert interleaved is not None and "6 pipeline stages" in interleaved
    assert {p.pp for p in enumerate_plans(small, 1024, 12, H100)} == {1, 2, 3, 4}
    # selective_every is checked against the largest stage (2 blocks with pp 3)
    assert plan_problem(small, ParallelPlan(pp=3, ac="selective", selective_every=2), 1024) is None
    too_sparse = plan_problem(small, ParallelPlan(pp=3, ac="selective", selective_every=3), 1024)
    assert too_sparse is not None and "selective_every 3" in too_sparse


def test_interleaved_schedule_divides_the_bubble_by_the_stages_per_rank() -> None:
    """Interleaved 1F1B: 2 stages per rank, same blocks per rank, bubble (p-1)/(2m+p-1) of the step."""
    plan, m = ParallelPlan(tp=8, pp=4, ac="full"), 8
    one = estimate(LLAMA_8B, plan, 8192, H100, microbatches=m)
    two = estimate(LLAMA_8B, plan, 8192, H100, CostOptions(pp_schedule="Interleaved1F1B"), microbatches=m)
    assert two.matmul_s == one.matmul_s and two.pp_bubble_s < one.pp_bubble_s
    assert two.pp_bubble_s / two.step_time_s == pytest.approx(pp_bubble_fraction(4, m, 2), rel=1e-12)
    with pytest.raises(ValueError, match="pp_schedule"):
        CostOptions(pp_schedule="1F2B")


# ---- memory and compute scaling ----------------------------------------------------------------------


@pytest.mark.parametrize("model", [GPT_175B, LLAMA_8B], ids=["gpt175b", "llama3_8b"])
def test_activation_memory_scales_as_one_over_cp_and_tp(model: ModelShape) -> None:
    """With SP (Megatron accounting) every saved activation is divided by tp; CP divides the tokens."""
    s = 65536
    base = estimate(model, ParallelPlan(), s, H100).activation_bytes
    for cp in (2, 4, 8):
        assert estimate(model, ParallelPlan(cp=cp), s, H100).activation_bytes * cp == pytest.approx(
            base, rel=1e-12
        )
    for tp in (2, 4, 8):
        # int64 token ids (8 bytes/token) are not split over tp: within 0.1%
        assert estimate(model, ParallelPlan(tp=tp), s, H100).activation_bytes * tp == pytest.approx(
            base, rel=1e-3
        )
    both = estimate(model, ParallelPlan(tp=4, cp=4), s, H100).activation_bytes
    assert both * 16 == pytest.approx(base, rel=1e-3)


def test_saved_gathered_inputs_break_one_over_tp() -> None:
    """DTensor TP saves the all-gathered linear inputs (2h per token per layer), which tp does not divide."""
    opt = CostOptions.cp_dtensor()
    h, b = LLAMA_8B.dim, opt.dtype_bytes
    per_tp1 = activation_bytes_per_token_layer(LLAMA_8B, 1, opt)
    per_tp8 = activation_bytes_per_token_layer(LLAMA_8B, 8, opt)
    assert per_tp8 == pytest.approx((per_tp1 - 2 * h * b) / 8 + 2 * h * b, rel=1e-12)


def test_megatron_accounting_is_34h_for_gpt() -> None:
    """Korthikanti et al.: 34*s*b*h bytes per layer in bf16 with dropout, flash attention adds 4 bytes per head."""
    per_token = activation_bytes_per_token_layer(GPT_175B, 1, CostOptions.megatron())
    assert per_token == 34 * GPT_175B.dim + 4 * GPT_175B.n_heads


def test_full_recompute_cuts_memory_and_adds_a_third_of_the_matmuls() -> None:
    """Full recompute keeps only block inputs and reruns each block's forward: +1/3 of the layer matmuls."""
    plan, s = ParallelPlan(tp=8, dp=8), 16384
    none = estimate(GPT_175B, plan, s, H100)
    full = estimate(GPT_175B, ParallelPlan(tp=8, dp=8, ac="full"), s, H100)
    assert full.activation_bytes < none.activation_bytes / 10
    layer_share = GPT_175B.n_layers * GPT_175B.layer_matmul_params
    layer_share /= layer_share + GPT_175B.head_params  # the output head is not recomputed
    assert full.matmul_s / none.matmul_s - 1 == pytest.approx(layer_share / 3, rel=1e-12)
    assert 0.32 < full.matmul_s / none.matmul_s - 1 <= 1 / 3
    # the attention forward is recomputed too: 1 extra forward on top of 1 + 2.5
    assert full.attention_s / none.attention_s == pytest.approx(4.5 / 3.5, rel=1e-12)


def test_cp_exposed_is_what_attention_does_not_hide() -> None:
    """exposed = sum over ring steps of max(0, transfer - attention block); without overlap: all of it."""
    s, plan = 131072, ParallelPlan(tp=8, cp=2, dp=4)
    est = estimate(LLAMA_8B, plan, s, H100)
    assert est.cp_comm_s > 0 and est.cp_exposed_s == 0  # 64K tokens per rank: the ring hides behind attention
    serial = estimate(LLAMA_8B, plan, s, H100, CostOptions(cp_overlap=False))
    assert serial.cp_exposed_s == pytest.approx(serial.cp_comm_s, rel=1e-12)
    short = estimate(GPT_175B, ParallelPlan(tp=8, cp=8, dp=1), 16384, H100)  # 2K tokens per rank over IB
    assert 0 < short.cp_exposed_s < short.cp_comm_s


def _saved_activation_bytes(model: torch.nn.Module, s: int, vocab: int) -> int:
    """Distinct storages autograd saves in forward + loss, parameters (and views of them) excluded."""
    tokens = torch.randint(0, vocab, (1, s + 1))
    with count_saved_tensors() as counter:
        token_loss_sum(model(tokens[:, :-1], torch.arange(s)[None]), tokens[:, 1:])
    return counter.bytes


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_activation_accounting_matches_saved_tensors_of_the_real_model(ac: str) -> None:
    """The cp_dtensor accounting (fp32 on CPU) predicts the bytes autograd saves for the small model.

    Measured at S = 512 in one process: none 46815244 bytes (predicted 46815232), full 4790284 (4790272),
    selective every 2nd block 25802764 (25802752); the 12 bytes left are scalars of the loss.
    """
    torch.manual_seed(0)
    shape, s = build_model_shape("small"), 512
    model = build_llama("small")
    model.init_weights(seed=0)
    apply_ac(model, ac)
    measured = _saved_activation_bytes(model, s, shape.vocab_size)
    opt = CostOptions.cp_dtensor(dtype_bytes=4)
    predicted = estimate(shape, ParallelPlan(ac=ac), s, build_hardware("cpu"), opt).activation_bytes
    assert predicted == pytest.approx(measured, rel=0.01)


# ---- the recommender ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "seq", "gpus"),
    [(GPT_175B, 8192, 64), (GPT_175B, 131072, 64), (LLAMA_8B, 131072, 8), (LLAMA_8B, 262144, 16)],
)
def test_recommender_never_returns_a_plan_that_does_not_fit(model: ModelShape, seq: int, gpus: int) -> None:
    """Every ranked row fits, the best is the first of them, rejected rows carry a reason."""
    rec = recommend(model, seq, gpus, H100)
    assert rec.rows, "something must fit in these settings"
    for row in rec.rows:
        assert row.fits and row.peak_bytes <= row.memory_limit_bytes
        assert row.plan.world_size == gpus
        assert row.plan.tp <= H100.devices_per_node
    assert rec.best is rec.rows[0]
    assert [r.tokens_per_s for r in rec.rows] == sorted((r.tokens_per_s for r in rec.rows), reverse=True)
    assert all(not r.fits and r.reason for r in rec.rejected)


def test_recommender_returns_nothing_when_nothing_fits() -> None:
    """175B on 8 H100s: the optimizer state alone (16 B/param / 8) exceeds 80 GiB."""
    rec = recommend(GPT_175B, 8192, 8, H100)
    assert rec.best is None and not rec.rows and rec.rejected


def test_gpt175b_long_sequences_prefer_cp_over_tp8_full_recompute() -> None:
    """The seed's Figure 2 setting on 64 H100s (4M-token batches, FSDP over dp x cp).

    Numbers this model produces (scripts/plan.py --model gpt175b --seq 65536 131072 --gpus 64):

    * 64K: best TP4 CP2 PP1 DP8 full, 269 s/step vs 286 s for TP8 CP1 DP8 full (1.06x). Halving TP halves
      the exposed TP collectives (12.5 s vs 29.3 s); CP2 stays inside a node and hides behind attention.
    * 128K: the baseline needs 89.5 GiB > 72 GiB usable and does not fit; the best plan that does is
      TP4 CP4 PP1 DP4 full, 372 s/step (1.04x the baseline's estimate), with 71.9 GiB of 72: one layer's
      ring backward holds 8.0 x its 384 MiB of local K+V, 3.0 GiB (Note [Ring transient memory]; at 9.5 x,
      before the accumulators and kernel outputs of a finished step were dropped, it did not fit).

    No plan without recompute fits at 64K+ on 64 GPUs: FSDP state takes 40.6 GiB per GPU.
    """
    for seq, min_speedup in ((65536, 1.03), (131072, 0.99)):
        rec = recommend(GPT_175B, seq, 64, H100)
        assert rec.best is not None and rec.baseline is not None
        assert rec.best.plan.cp > 1, rec.best.plan.label
        assert rec.baseline.plan == ParallelPlan(tp=8, cp=1, pp=1, dp=8, ac="full")
        speedup = rec.speedup(rec.best)
        assert speedup is not None and speedup > min_speedup
    assert recommend(GPT_175B, 65536, 64, H100).baseline.fits  # type: ignore[union-attr]
    assert not recommend(GPT_175B, 131072, 64, H100).baseline.fits  # type: ignore[union-attr]
    tp4cp4 = estimate(GPT_175B, ParallelPlan(tp=4, cp=4, dp=4, ac="full"), 131072, H100, microbatches=8)
    assert tp4cp4.fits and tp4cp4.ring_transient_bytes == 3 * GIB  # 8.0 x 384 MiB, counted in the peak
    assert tp4cp4.peak_bytes + 1.5 * tp4cp4.ring_transient_bytes > tp4cp4.memory_limit_bytes  # 9.5 x: no fit


def test_selective_picks_the_sparsest_recomputation_that_fits() -> None:
    """A selective row uses the largest N (recompute every N-th block) for which the plan fits."""
    rec = recommend(GPT_175B, 8192, 64, H100, plans=[ParallelPlan(tp=8, dp=8, ac="selective")])
    (row,) = rec.rows
    n = row.plan.selective_every
    assert n > 2
    sparser = [k for k in (4, 6, 8) if k > n]
    for k in sparser:
        assert not estimate(
            GPT_175B, ParallelPlan(tp=8, dp=8, ac="selective", selective_every=k), 8192, H100
        ).fits


# ---- parallel plans, calibration and the script -------------------------------------------------------


def test_parallel_plan_parse() -> None:
    """Parallel plan strings: degrees then an optional AC mode; dp is inferred from the world size."""
    assert ParallelPlan.parse("tp4+full", 4) == ParallelPlan(tp=4, dp=1, ac="full")
    assert ParallelPlan.parse("tp2cp2", 8) == ParallelPlan(tp=2, cp=2, dp=2)
    assert ParallelPlan.parse("tp8cp2pp2dp2+selective/4") == ParallelPlan(8, 2, 2, 2, "selective", 4)
    with pytest.raises(ValueError, match="Cannot parse parallel plan"):
        ParallelPlan.parse("tp4 full")
    with pytest.raises(ValueError, match="not divisible"):
        ParallelPlan.parse("tp3", 4)


def _write_calibration(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text(
        json.dumps(
            {"model": "small", "seq_len": 2048, "hardware": {"layer_overhead_s": 0.003}, "measurements": rows}
        )
    )


def test_calibration_round_trip(tmp_path: Path) -> None:
    """Measured values equal to the prediction give zero error; hardware overrides are applied."""
    shape, hw = build_model_shape("small"), build_hardware("cpu", {"layer_overhead_s": 0.003})
    opt = CostOptions.cp_dtensor(dtype_bytes=4)
    plan = ParallelPlan(tp=2, cp=2)
    pred = estimate(shape, plan, 2048, hw, opt)
    _write_calibration(
        tmp_path / "c.json",
        [
            {
                "layout": plan.to_dict(),
                "step_time_s": pred.step_time_s,
                "activation_bytes": 2 * pred.activation_bytes,
            }
        ],
    )
    cal = load_calibration(tmp_path / "c.json")
    assert cal.model == "small" and cal.hardware_overrides == {"layer_overhead_s": 0.003}
    (cmp,) = compare_measurements(shape, cal.measurements, build_hardware("cpu", cal.hardware_overrides), opt)
    assert cmp.step_time_error == pytest.approx(0.0, abs=1e-12)
    assert cmp.activation_error == pytest.approx(-0.5, rel=1e-12)


def test_calibration_rejects_unknown_keys(tmp_path: Path) -> None:
    """Typos in the calibration file are errors that name the key."""
    (tmp_path / "bad.json").write_text(json.dumps({"hardwar": {}, "measurements": []}))
    with pytest.raises(ValueError, match="hardwar"):
        load_calibration(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="peak_flop"):
        build_hardware("cpu", {"peak_flop": 1.0})


def test_plan_script_gpu_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    """The sweep prints the TP x CP table against the TP8 CP1 full baseline and one recommendation per length."""
    plan = _load_plan_script()
    assert plan.main(["--model", "gpt175b", "--seq", "8192", "131072", "--gpus", "64", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Speedup over TP8 CP1 PP1 DP8 full by TP x CP mix, 64 GPUs" in out
    assert "| TP4 CP4 |" in out and "1.00 (OOM)" in out  # the baseline does not fit at 128K
    assert out.count("Recommendation (seq") == 2


def test_plan_script_cpu_plans_with_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CPU scale: the bench plans are predicted, and predicted vs measured shows the relative errors."""
    plan = _load_plan_script()
    _write_calibration(
        tmp_path / "results.json",
        [
            {"layout": {"tp": 4, "ac": "full"}, "step_time_s": 1.0, "activation_bytes": 1e7},
            {"layout": {"tp": 2, "cp": 2}, "step_time_s": 1.0},
            {"layout": "cp4", "step_time_s": 1.0, "activation_bytes": None},
        ],
    )
    assert plan.main(["--hw", "cpu", "--calibrate-from", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "impl cp_dtensor, dtype 4 bytes" in out
    for label in ("TP4 CP1 PP1 DP1 full", "TP2 CP2 PP1 DP1 none", "TP1 CP4 PP1 DP1 none"):
        assert out.count(f"| {label} |") == 2  # the plans table and the comparison table
    assert "Predicted vs measured" in out and "mean |error|: step time" in out
    rows = [line for line in out.splitlines() if line.startswith("| TP4 CP1 PP1 DP1 full | 2048 |")]
    predicted, error = float(rows[0].split("|")[3]), rows[0].split("|")[5].strip()
    assert error == f"{predicted - 1.0:+.1%}"
    assert math.isfinite(predicted)


# ---- machine calibration (scripts/plan.py --calibrate) and the ring's transient memory ------------------


def _synthetic_probe(share: float = 0.5, ranks: int = 2) -> tuple[object, list[dict[str, object]]]:
    """Per-rank probe results generated from known constants (CPU seconds for compute, wall for comm)."""
    from cp_dtensor.tools.planner.measure import ProbeSpec

    spec = ProbeSpec(ranks=ranks, dtypes=("float32",), layer_tokens=(256, 1024))
    call, full_f, full_b, causal_factor = 2e-4, 2e-9, 5e-9, 1.5
    rows = []
    for s, heads in spec.attention_shapes:
        for causal in (False, True):
            elements = heads * (s * (s + 1) / 2 if causal else s * s)
            k = causal_factor if causal else 1.0
            fwd, bwd = call + k * full_f * elements, call + k * full_b * elements
            rows.append(
                {"seq": s, "heads": heads, "causal": causal, "elements": elements, "fwd": fwd, "bwd": bwd}
            )
    lat, bw, c_lat, c_bw = 3e-4, 1e9, 5e-4, 5e8
    p2p = {str(size): lat + size / bw for size in spec.sizes}
    p2p.update({f"cpu {size}": 1e-4 + 2 * size * 1e-9 for size in spec.sizes})  # 1 ns of CPU per byte moved
    coll = {
        f"{n}:{size}": {
            "n": n,
            "bytes": size,
            "all_gather": (n - 1) / n * size / c_bw + (n - 1) * c_lat,
            "reduce_scatter": (n - 1) / n * size / c_bw + (n - 1) * c_lat,
        }
        for n in (2, 4)
        for size in (4096, 1 << 20, 4 << 20)
    }
    fixed, per_token = 1e-3, 4e-6
    layer = [
        {"tokens": s, "fwd": 0.05 + fixed + per_token * s, "bwd": 0.1 + fixed + 2 * per_token * s,
         "kernels_fwd": 0.05, "kernels_bwd": 0.1}
        for s in spec.layer_tokens
    ]  # fmt: skip
    rank = {
        "core_share": share,
        "matmul": {"float32": {"median_flops": 80e9}},
        "attention": {"rows": rows},
        "layer": layer,
        "p2p_ring": p2p,
        "p2p_pair": p2p,
        "collectives": coll,
    }
    return spec, [rank] * ranks


def test_machine_calibration_fits_recover_the_constants_and_round_trip_into_a_preset(tmp_path: Path) -> None:
    """hardware_from_probe inverts the timing models; the file is a Hardware preset that --hw accepts."""
    from cp_dtensor.tools.planner import load_hardware
    from cp_dtensor.tools.planner.measure import hardware_from_probe

    spec, per_rank = _synthetic_probe(share=0.5)
    hw_fields = hardware_from_probe(spec, per_rank)["hardware"]
    # compute: CPU rates times the core share; comm: as measured
    assert hw_fields["peak_flops"] * hw_fields["matmul_efficiency"] == pytest.approx(40e9, rel=1e-9)
    head_dim = build_model_shape("small").head_dim
    at_rate = hw_fields["peak_flops"] * hw_fields["attention_efficiency"]
    assert at_rate == pytest.approx(4 * head_dim / 2e-9 * 0.5, rel=1e-6)
    bwd_rate = hw_fields["peak_flops"] * hw_fields["attention_backward_efficiency"]
    assert bwd_rate == pytest.approx(2.5 * 4 * head_dim / 5e-9 * 0.5, rel=1e-6)
    assert hw_fields["causal_attention_factor"] == pytest.approx(1.5, rel=1e-6)
    assert hw_fields["kernel_call_overhead_s"] == pytest.approx(2e-4 / 0.5, rel=1e-6)
    assert hw_fields["intra_node_latency_s"] == pytest.approx(3e-4, rel=1e-6)
    assert hw_fields["intra_node_bandwidth"] == pytest.approx(1e9, rel=1e-6)
    assert hw_fields["collective_latency_s"] == pytest.approx(5e-4, rel=1e-6)
    assert hw_fields["collective_bandwidth"] == pytest.approx(5e8, rel=1e-6)
    assert hw_fields["comm_compute_bandwidth"] == pytest.approx(1e9 * 0.5, rel=1e-6)
    assert hw_fields["layer_overhead_s"] == pytest.approx(1e-3 / 0.5, rel=1e-6)
    act = activation_bytes_per_token_layer(
        build_model_shape("small"), 1, CostOptions.cp_dtensor(dtype_bytes=4)
    )
    assert hw_fields["elementwise_bandwidth"] == pytest.approx(act / 4e-6 * 0.5, rel=1e-6)

    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"preset": "cpu", "hardware": hw_fields, "machine": {"core_share": 0.5}}))
    hw, cal = load_hardware(path)
    assert cal is not None and cal.preset == "cpu" and cal.machine == {"core_share": 0.5}
    assert hw == build_hardware("cpu", hw_fields)
    assert hw.memory_bytes == build_hardware("cpu").memory_bytes  # fields not measured stay the preset's
    assert hw.collective_link(4) == (pytest.approx(5e8), pytest.approx(5e-4))
    assert hw.link(4) == (pytest.approx(1e9), pytest.approx(3e-4))
    assert load_hardware("H100") == (H100, None)
    with pytest.raises(ValueError, match="not a preset"):
        load_hardware(tmp_path / "missing.json")


def test_plan_script_accepts_a_calibrated_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--hw FILE: the plans are priced with the file's hardware, and as CPU (cp_dtensor accounting, fp32)."""
    from cp_dtensor.tools.planner.measure import hardware_from_probe

    spec, per_rank = _synthetic_probe()
    path = tmp_path / "calib.json"
    fitted = hardware_from_probe(spec, per_rank)
    path.write_text(json.dumps({"preset": "cpu", "hardware": fitted["hardware"], "machine": fitted["fits"]}))
    plan = _load_plan_script()
    argv = [
        "--model",
        "small",
        "--hw",
        str(path),
        "--gpus",
        "4",
        "--seq",
        "4096",
        "--plans",
        "tp4+full",
        "cp4",
    ]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "# hardware calibrated cpu (2 ranks)" in out and "impl cp_dtensor, dtype 4 bytes" in out
    assert "| 1 | TP4 CP1 PP1 DP1 full |" in out and "| 2 | TP1 CP4 PP1 DP1 none |" in out
    with pytest.raises(SystemExit, match="not a preset"):
        plan.main(["--hw", str(tmp_path / "nope.json")])


def test_calibrated_terms_price_what_they_name() -> None:
    """Calibrated terms: the causal factor charges only the masked (diagonal) calls, the kernel-call term
    cp calls per pass (forward and backward), the elementwise term streams the saved activation bytes
    (1 forward + 2 backward per block)."""
    small, s = build_model_shape("small"), 4096
    opt = CostOptions.cp_dtensor(dtype_bytes=4)
    base = build_hardware("cpu")
    plan = ParallelPlan(cp=4)
    ref = estimate(small, plan, s, base, opt)
    causal = estimate(small, plan, s, base.with_overrides({"causal_attention_factor": 2.0}), opt)
    assert causal.attention_s / ref.attention_s == pytest.approx(1 + 1 / 4, rel=1e-12)  # 1 of 4 ring steps
    calls = estimate(small, plan, s, base.with_overrides({"kernel_call_overhead_s": 1e-3}), opt)
    assert calls.attention_s - ref.attention_s == pytest.approx(small.n_layers * 2 * 4 * 1e-3, rel=1e-9)
    bw = 1e9
    elem = estimate(small, plan, s, base.with_overrides({"elementwise_bandwidth": bw}), opt)
    per_block = s / 4 * activation_bytes_per_token_layer(small, 1, opt) / bw
    assert elem.overhead_s - ref.overhead_s == pytest.approx(small.n_layers * 3 * per_block, rel=1e-9)


def test_ring_transient_memory_is_one_layer_of_buffers_flat_in_cp() -> None:
    """Note [Ring transient memory]: backward peak 7.0 x local K+V at cp 2, 8.0 x at cp >= 3, none at cp 1;
    one layer's ring, added to the peak (not to the saved activations)."""
    small = build_model_shape("small")
    opt = CostOptions.cp_dtensor(dtype_bytes=4)
    hw = build_hardware("cpu")
    s_local = 1024

    def kv_local(cp: int, tp: int = 1) -> float:
        return 2.0 * s_local * (small.n_kv_heads // tp) * small.head_dim * 4

    assert estimate(small, ParallelPlan(), s_local, hw, opt).ring_transient_bytes == 0
    for cp, multiple in ((2, 7.0), (4, 8.0), (8, 8.0)):
        est = estimate(small, ParallelPlan(cp=cp), s_local * cp, hw, opt)
        assert est.ring_transient_bytes == pytest.approx(multiple * kv_local(cp), rel=1e-12)
        rest = est.activation_bytes + est.working_bytes + est.state_bytes + est.transient_bytes
        assert est.peak_bytes == pytest.approx(rest + est.ring_transient_bytes, rel=1e-12)
    # forward peaks 3.0 and 3.6 x; tp splits the KV heads
    assert ring_transient_bytes(small, 2 * s_local, 2, dtype_bytes=4) == (
        3.0 * kv_local(2),
        7.0 * kv_local(2),
    )
    assert ring_transient_bytes(small, 4 * s_local, 4, tp=2, dtype_bytes=4) == pytest.approx(
        (3.6 * kv_local(4, 2), 8.0 * kv_local(4, 2))
    )
    # flat in cp at a fixed local shard, linear in the shard
    assert ring_transient_bytes(small, 16 * s_local, 16)[1] == ring_transient_bytes(small, 4 * s_local, 4)[1]
    assert (
        ring_transient_bytes(small, 8 * s_local, 4)[1] == 2 * ring_transient_bytes(small, 4 * s_local, 4)[1]
    )


def test_plan_script_calibrate_quick_smoke(tmp_path: Path) -> None:
    """``plan.py --calibrate --quick`` measures 2 local ranks at tiny sizes and writes a usable preset."""
    import subprocess

    out = tmp_path / "calib.json"
    proc = subprocess.run(
        [sys.executable, "scripts/plan.py", "--calibrate", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core share per rank" in proc.stdout and f"wrote {out}" in proc.stdout
    data = json.loads(out.read_text())
    assert data["preset"] == "cpu" and data["machine"]["spec"]["ranks"] == 2
    hw = load_calibration(out).build_hardware()
    assert hw.name == "calibrated cpu (2 ranks)" and hw.peak_flops > 0 and hw.intra_node_bandwidth > 0


# ----------------------------------------------------------------------------------------------------
# CP communication strategy (Note [CP strategy cost]); the bytes are checked against measured ring and
# all-to-all traffic in tests/test_ring_attention.py and tests/test_alltoall.py.


def _choice(model: str, seq: int, cp: int, tp: int = 1, hw: str = "h100"):
    from cp_dtensor.tools.planner import choose_strategy, model_attention_problem

    return choose_strategy(model_attention_problem(build_model_shape(model), seq, cp, tp), build_hardware(hw))


def test_long_sequences_keep_the_ring_which_hides_its_transfers() -> None:
    best, rows = _choice("llama3_8b", 1 << 20, 8)
    assert best.comm == "p2p" and best.exposed_s == 0.0
    assert "hides its K/V transfers" in best.reason
    # every strategy does the same attention work; only the calls and the exposed traffic differ
    assert all(r.compute_s > 0 for r in rows if r.valid)


def test_short_sequences_over_several_nodes_pick_node_sized_all_to_all_groups() -> None:
    best, rows = _choice("llama3_8b", 32768, 32)  # 4 nodes of 8: the ring alone cannot hide its steps
    assert (best.comm, best.a2a_size) == ("hybrid", 8)
    p2p = next(r for r in rows if r.comm == "p2p")
    assert p2p.exposed_s > best.exposed_s and best.time_s < p2p.time_s
    assert "groups of 8 ranks" in best.reason and "ring of 4 groups" in best.reason


def test_heads_that_do_not_split_make_a_strategy_invalid_with_the_reason() -> None:
    _, rows = _choice("llama3_70b", 32768, 16, tp=8)  # 8 query heads, 1 KV head per tp rank
    alltoall = next(r for r in rows if r.comm == "alltoall")
    assert (
        not alltoall.valid
        and "splits the heads over 16 ranks" in alltoall.reason
        and "8 query heads and 1 key/value heads" in alltoall.reason
    )
    assert {r.a2a_size for r in rows if r.comm == "hybrid" and r.valid} == {2, 4, 8}


def test_a_tie_goes_to_the_simpler_strategy() -> None:
    from cp_dtensor.attention.choice import preference_key
    from cp_dtensor.tools.planner.cp_strategy import TIE, StrategyEstimate

    p2p = StrategyEstimate("p2p", compute_s=1.0, exposed_s=0.005)
    hybrid = StrategyEstimate("hybrid", a2a_size=2, compute_s=1.0)
    assert hybrid.time_s < p2p.time_s <= hybrid.time_s * (1 + TIE)
    assert min((p2p, hybrid), key=preference_key) is p2p


def test_choose_comm_passes_named_strategies_through_and_resolves_auto_and_hybrid() -> None:
    from cp_dtensor.attention.choice import choose_comm

    shape = dict(heads=32, kv_heads=8, head_dim=128, seq_len=32768, cp=32, device="cpu", hardware="h100")
    assert choose_comm("p2p", **shape).comm == "p2p" and choose_comm("p2p", **shape).table == ()
    auto = choose_comm("auto", **shape)
    assert (auto.comm, auto.a2a_size) == ("hybrid", 8) and "[h100]" in auto.reason
    assert len(auto.table) == 2 + 4 + 1  # p2p, allgather, hybrid 2/4/8/16, alltoall
    assert choose_comm("hybrid", **shape).comm == "hybrid"
    assert choose_comm("auto", **{**shape, "cp": 1}).comm == "p2p"
    with pytest.raises(ValueError, match="a2a_size=4 with comm='auto'"):
        choose_comm("auto", a2a_size=4, **shape)
    with pytest.raises(ValueError, match="comm='hybrid' needs a group size"):
        choose_comm("hybrid", **{**shape, "heads": 3, "kv_heads": 1, "cp": 4})
