"""The trainer: end-to-end train.py run, exact resume, resharding on load, learning the long-range task."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cp_dtensor.config import JobConfig
from cp_dtensor.trainer import MemoryBudget

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-5  # layouts differ only in summation order (see test_training_parity.py)
# bf16 parameters: every matmul output is rounded to 8 mantissa bits, so the summation order that CP
# changes moves the loss more than in fp32: at most 8e-5 relative over the 8 steps of the bf16 test here.
# 5e-4 leaves 6x room; a ring that skips its last step moves the loss by 1.5e-3 - 2.4e-3 (steps 6-8).
BF16_LOSS_RTOL = 5e-4


def _config(dump: str, **sections: dict) -> dict:
    base = {
        "job": {"dump_folder": dump},
        "model": {"flavor": "debug"},
        "training": {"seq_len": 128, "local_batch_size": 4, "steps": 6, "warmup_steps": 2, "lr": 1e-3},
        "parallelism": {"context_parallel_degree": 2},
        "checkpoint": {"enable": True, "interval": 3},
        "metrics": {"log_freq": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def run_trainer(cfg: dict) -> list[float]:
    """Build a Trainer from ``cfg`` on this rank and return the per-step global losses."""
    from cp_dtensor.trainer import Trainer

    return [r.loss for r in Trainer(JobConfig.from_dict(cfg)).train()]


def _assert_losses_match(
    got: list[float], want: list[float], rtol: float, steps: list[int] | None = None
) -> None:
    steps = steps or list(range(1, len(want) + 1))
    for step, a, b in zip(steps, got, want, strict=True):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: loss {a} with CP vs {b} without (rtol {rtol})"


def test_train_py_end_to_end(tmp_path: Path, dist_pool) -> None:
    """train.py with the quickstart config (cp 2) logs as configured and gives the losses of a run without CP."""
    from cp_dtensor.config import load_config

    args = [
        "--config", "train_configs/debug_cpu.toml", "--training.steps", "12", "--metrics.log_freq", "4",
        "--checkpoint.enable", "false",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "train.py", *args, f"--job.dump_folder={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert [int(re.match(r"step\s+(\d+)/", line).group(1)) for line in lines] == [1, 4, 8, 12]
    assert "cp 2" in proc.stdout
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 4, 8, 12]
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5, logged
    # The same global batches without CP (dp 2 x 4 rows instead of cp 2 x 8 rows: same data, same steps).
    no_cp = load_config(
        [
            *args, f"--job.dump_folder={tmp_path / 'no_cp'}", "--parallelism.context_parallel_degree", "1",
            "--parallelism.data_parallel_degree", "2", "--training.local_batch_size", "4",
        ]
    )  # fmt: skip
    want = dist_pool(2).run(run_trainer, no_cp.to_dict())[0]
    steps = [r["step"] for r in logged]
    _assert_losses_match([r["loss"] for r in logged], [want[s - 1] for s in steps], LOSS_RTOL, steps)


def test_resume_gives_identical_losses(tmp_path: Path, dist_pool) -> None:
    cfg = _config(str(tmp_path))
    full = dist_pool(2).run(run_trainer, cfg)[0]  # saves step-3 and step-6
    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    resumed = dist_pool(2).run(run_trainer, cfg)[0]  # resumes at step 3
    assert len(full) == 6 and len(resumed) == 3
    assert resumed == full[3:], (resumed, full)  # bit-identical: same data, same state, same reductions


def test_checkpoint_saved_with_cp2_tp2_loads_under_dp4(tmp_path: Path, dist_pool) -> None:
    batch = {"global_batch_size": 4, "local_batch_size": 1}  # cp2 x tp2: 4 accumulation steps; dp4: 1
    saved = _config(
        str(tmp_path), training=batch, parallelism={"context_parallel_degree": 2, "tensor_parallel_degree": 2}
    )
    reference = dist_pool(4).run(run_trainer, saved)[0]
    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    resharded = _config(
        str(tmp_path), training=batch, parallelism={"data_parallel_degree": 4, "context_parallel_degree": 1}
    )
    resumed = dist_pool(4).run(run_trainer, resharded)[0]
    assert len(resumed) == 3
    for a, b in zip(resumed, reference[3:]):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (resumed, reference)


def _recall_ranks_of_samples(cfg: JobConfig, n: int = 8) -> tuple[set[int], set[int]]:
    """CP ranks holding the cue tokens and the query positions of the first ``n`` samples the trainer trains
    on, found in the samples themselves (value tokens, labelled positions) and mapped by the layout."""
    from cp_dtensor.layout import sequence_positions
    from cp_dtensor.models.llama import LLAMA3_FLAVORS
    from cp_dtensor.trainer import _build_data

    seq, cp, layout = (
        cfg.training.seq_len,
        cfg.parallelism.context_parallel_degree,
        cfg.cp_layout,
    )
    data = _build_data(cfg, LLAMA3_FLAVORS[cfg.model.flavor].vocab_size, n)
    owner = torch.empty(seq, dtype=torch.int64)  # (S,) CP rank of each position
    for rank in range(cp):
        owner[sequence_positions(seq, rank, cp, layout)] = rank
    lo, hi = data.loader.dataset.value_range
    batch = next(data.loader)
    cue = (batch["tokens"] >= lo) & (batch["tokens"] < hi)  # (n, S) the cue copies
    queries = batch["labels"] != -100  # (n, S)
    assert cue.any(dim=1).all() and queries.any(dim=1).all()
    where = owner.expand(n, seq)
    return set(where[cue].tolist()), set(where[queries].tolist())


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [2, 4])
def test_synthetic_cue_and_queries_sit_on_different_cp_ranks(layout: str, cp: int, tmp_path: Path) -> None:
    cfg = JobConfig.from_dict(
        _config(str(tmp_path), parallelism={"context_parallel_degree": cp, "context_parallel_layout": layout})
    )
    cue_ranks, query_ranks = _recall_ranks_of_samples(cfg)
    assert not cue_ranks & query_ranks, (cue_ranks, query_ranks)


def test_synthetic_task_is_learned_with_cp2(tmp_path: Path, dist_pool) -> None:
    cfg = _config(
        str(tmp_path),
        training={
            "seq_len": 256,
            "local_batch_size": 8,
            "steps": 150,
            "lr": 1e-3,
            "warmup_steps": 0,
            "lr_schedule": "constant",
            "weight_decay": 0.0,
            "beta2": 0.999,
        },
        checkpoint={"enable": False},
    )
    # The cue and the queries on different CP ranks: learning the task needs the ring's cross-rank steps.
    cue_ranks, query_ranks = _recall_ranks_of_samples(JobConfig.from_dict(cfg))
    assert not cue_ranks & query_ranks, (cue_ranks, query_ranks)
    losses = dist_pool(2).run(run_trainer, cfg)[0]
    chance = 2.772588722239781  # ln(16): the dataset's uniform guess over 16 possible answers
    tail = sum(losses[-10:]) / 10
    assert tail < 0.5 * chance, f"mean loss of the last 10 steps {tail:.3f} vs chance {chance:.3f}"


# config.json of the model folder each model.flavor = "hf" config names (tests/data/hf_configs/).
HF_CONFIGS = {
    "llama3_1_8b_128k_hf.toml": "llama3_1_8b.json",
    "qwen3_8b_128k_hf.toml": "qwen3_8b.json",
    "tiny_hf_sft_cpu.toml": "tiny_llama.json",
}


@pytest.mark.parametrize("path", sorted((ROOT / "train_configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path, tmp_path: Path) -> None:
    from cp_dtensor.cli import local_world_size
    from cp_dtensor.config import load_config
    from cp_dtensor.trainer import validate_job

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    argv = ["--config", str(path), "--data.paths", str(corpus)]  # GPU configs name a placeholder
    if load_config(argv).model.flavor == "hf":  # the model folder's config.json, as published (no weights)
        shutil.copyfile(
            ROOT / "tests" / "data" / "hf_configs" / HF_CONFIGS[path.name], tmp_path / "config.json"
        )
        argv += ["--model.hf_assets_path", str(tmp_path), "--checkpoint.initial_load_in_hf", "false"]
    cfg = load_config(argv)
    # The debug configs run here (this machine's memory); the others are checked against the GPU this
    # project's CUDA runs used, an H200 (141 GiB; see README "Status").
    gpu = None if path.name.startswith("debug") else MemoryBudget(141 * 2**30, "an H200")
    pd = validate_job(cfg, local_world_size(cfg), memory=gpu)
    assert pd.world_size == local_world_size(cfg)


def test_activation_estimate_is_the_planners_formula() -> None:
    """The trainer's memory check (own few lines: training does not import the planner) and the planner's
    calibrated cost model (``CostOptions.cp_dtensor()``) give the same activation bytes per rank."""
    from cp_dtensor.config import load_config
    from cp_dtensor.tools.planner import CostOptions, ModelShape, ParallelPlan, build_hardware, estimate
    from cp_dtensor.trainer import activation_bytes_per_rank, model_args_for, validate_job

    cases = [  # (flavor, seq_len, local batch, cp, tp, pp, ac, bf16); pp 2 runs 2 microbatches (1F1B)
        ("debug", 1024, 8, 2, 1, 1, "none", False),
        ("small", 4096, 2, 2, 2, 1, "full", False),
        ("debug_deep", 512, 4, 2, 1, 2, "selective", False),
        ("8B", 131072, 1, 4, 2, 1, "selective", True),
        ("70B", 131072, 1, 8, 8, 1, "full", True),
    ]
    for flavor, seq, batch, cp, tp, pp, ac, bf16 in cases:
        cfg = load_config(
            [
                "--model.flavor", flavor, "--training.seq_len", str(seq), "--training.local_batch_size", str(batch),
                "--parallelism.context_parallel_degree", str(cp), "--parallelism.tensor_parallel_degree", str(tp),
                "--parallelism.pipeline_parallel_degree", str(pp), "--activation_checkpoint.mode", ac,
                "--training.mixed_precision_param", "bfloat16" if bf16 else "float32",
            ]
        )  # fmt: skip
        pd = validate_job(cfg, cp * tp * pp, memory=MemoryBudget(2.0**60, "plenty"))
        ours = activation_bytes_per_rank(cfg, pd, model_args_for(cfg))
        plan = ParallelPlan(tp=tp, cp=cp, pp=pp, ac=ac)
        opt = CostOptions.cp_dtensor(dtype_bytes=2 if bf16 else 4)
        shape, hw = ModelShape.from_flavor(flavor), build_hardware("h200")
        est = estimate(shape, plan, seq, hw, opt, micro_batch=batch // pp, microbatches=pp)
        theirs = est.activation_bytes + est.working_bytes
        assert ours == pytest.approx(theirs, rel=1e-9), (flavor, ours / 2**30, theirs / 2**30)


def test_memory_check_refuses_warns_or_passes(tmp_path: Path) -> None:
    from cp_dtensor.trainer import activation_bytes_per_rank, model_args_for, validate_job

    cfg = JobConfig.from_dict(_config(str(tmp_path)))
    pd = validate_job(cfg, 2, memory=MemoryBudget(2.0**60, "plenty"))
    need = activation_bytes_per_rank(cfg, pd, model_args_for(cfg))
    warnings: list[str] = []
    validate_job(cfg, 2, memory=MemoryBudget(4 * need, "4x"), warn=warnings.append)
    assert warnings == []
    validate_job(cfg, 2, memory=MemoryBudget(1.5 * need, "a GPU of 1.5x"), warn=warnings.append)
    assert len(warnings) == 1 and "67% of the" in warnings[0] and "(a GPU of 1.5x)" in warnings[0], warnings
    with pytest.raises(ValueError) as e:
        validate_job(cfg, 2, memory=MemoryBudget(0.5 * need, "a GPU of 0.5x"))
    assert "more than the" in str(e.value) and "(a GPU of 0.5x)" in str(e.value)
    fixes = (
        'raise parallelism.context_parallel_degree (more devices), set activation_checkpoint.mode = "full"'
    )
    assert str(e.value).endswith(f"; {fixes} or lower training.local_batch_size."), e.value
    with pytest.raises(ValueError) as e:  # CPU RAM shared by the local ranks: more CP ranks do not help
        validate_job(cfg, 2, memory=MemoryBudget(0.5 * need, "RAM", shared=True))
    assert str(e.value).endswith(
        '; set activation_checkpoint.mode = "full" or lower training.local_batch_size.'
    )


def test_readme_config_reference_matches_the_code() -> None:
    from cp_dtensor.config import format_markdown_reference

    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- config-reference:start")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- config-reference:end -->")].strip()
    assert table == format_markdown_reference(), (
        "regenerate the README table from format_markdown_reference()"
    )


def test_train_py_help_lists_every_option() -> None:
    from cp_dtensor.config import JobConfig

    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for section, values in JobConfig().to_dict().items():
        for key in values:
            assert f"--{section}.{key}" in proc.stdout


def test_bad_config_is_one_clear_line_and_exit_2() -> None:
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "train_configs/debug_cpu.toml",
        "--training.seq_len",
        "1002",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line, no traceback
    assert "training.seq_len=1002 must be a multiple of 4" in proc.stderr


def test_plot_loss_makes_a_png(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": {5.0 / s}}}\n' for s in range(1, 6)))
    out = tmp_path / "loss.png"
    proc = subprocess.run(
        [sys.executable, "scripts/plot_loss.py", str(log), "--chance", "2.77", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_meta_init(degrees: dict, flavor: str) -> dict:
    """The trainer's init path (meta build -> parallelize -> to_empty -> init_weights): full weights."""
    import torch
    from dist_harness import cached_parallel_dims

    from cp_dtensor.models.llama import build_llama
    from cp_dtensor.parallelize import build_parallel_model

    pd = cached_parallel_dims(**degrees)
    with torch.device("meta"):
        model = build_llama(flavor)
    pm = build_parallel_model(model, pd, device=torch.device("cpu"))
    full = {}
    for part in pm.model_parts:
        part.to_empty(device="cpu")
        part.init_weights(seed=0)
        for name, p in part.named_parameters():
            full[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return full


@pytest.mark.parametrize("degrees", [{"cp": 2, "tp": 2}, {"dp": 2, "cp": 2}, {"pp": 2, "cp": 2}], ids=str)
def test_same_seed_gives_the_same_full_weights_for_any_degrees(degrees: dict, dist_pool) -> None:
    from cp_dtensor.models.llama import build_llama

    reference = build_llama("debug_deep")
    reference.init_weights(seed=0)
    want = dict(reference.named_parameters())
    seen = {}
    for rank_weights in dist_pool(4).run(run_meta_init, degrees, "debug_deep"):
        seen.update(rank_weights)
    assert set(seen) == set(want)
    for name, w in want.items():
        assert torch.equal(seen[name], w), name  # bit-identical, not just close


def test_bf16_mixed_precision_and_text_data_train(tmp_path: Path, dist_pool) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"document {i}: " + "the quick brown fox " * 20}) + "\n" for i in range(40)
        )
    )
    cfg = _config(
        str(tmp_path),
        training={
            "seq_len": 128,
            "local_batch_size": 2,
            "steps": 8,
            "lr": 3e-3,
            "mixed_precision_param": "bfloat16",
        },
        data={"dataset": "text", "paths": [str(corpus)]},
        checkpoint={"enable": False},
    )
    losses = dist_pool(2).run(run_trainer, cfg)[0]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0, losses
    no_cp = _config(
        str(tmp_path / "no_cp"),
        training={**cfg["training"], "local_batch_size": 1},  # dp 2 x 1 row: the same 2-row global batches
        parallelism={"context_parallel_degree": 1, "data_parallel_degree": 2},
        data=cfg["data"],
        checkpoint={"enable": False},
    )
    _assert_losses_match(losses, dist_pool(2).run(run_trainer, no_cp)[0], BF16_LOSS_RTOL)


def test_job_comm_auto_prices_this_jobs_attention_and_heads_that_cannot_split_fail_early() -> None:
    from cp_dtensor.config import load_config
    from cp_dtensor.parallel_dims import ParallelDims
    from cp_dtensor.trainer import job_comm_choice, model_args_for, validate_job

    base = ["--model.flavor", "8B", "--training.seq_len", "32768", "--training.local_batch_size", "1"]
    base += ["--parallelism.context_parallel_degree", "32", "--training.mixed_precision_param", "bfloat16"]
    cfg = load_config([*base, "--parallelism.context_parallel_comm", "auto"])
    cfg.parallelism.context_parallel_cost_hardware = "h100"
    pd = ParallelDims(dp=1, cp=32, tp=1, pp=1, world_size=32)
    choice = job_comm_choice(cfg, pd, model_args_for(cfg), torch.device("cpu"))
    assert (choice.comm, choice.a2a_size) == ("hybrid", 8) and len(choice.table) == 7  # as the planner
    named = load_config([*base, "--parallelism.context_parallel_comm", "allgather"])
    assert job_comm_choice(named, pd, model_args_for(named), torch.device("cpu")).comm == "allgather"
    # debug: 4 query / 2 KV heads; all-to-all over 8 ranks cannot split them: one line before any collective
    bad = load_config(
        ["--parallelism.context_parallel_degree", "8", "--parallelism.context_parallel_comm", "alltoall"]
    )
    with pytest.raises(ValueError) as err:
        validate_job(bad, 8)
    assert "flavor 'debug'" in str(err.value) and "splits the heads over 8 ranks" in str(err.value)
    assert "4 query heads and 2 key/value heads" in str(err.value) and "\n" not in str(err.value)
    unknown = load_config(
        ["--parallelism.context_parallel_degree", "2", "--parallelism.context_parallel_comm", "auto"]
    )
    unknown.parallelism.context_parallel_cost_hardware = "tpu"
    with pytest.raises(ValueError, match=r"cost_hardware: Unknown hardware 'tpu': not a preset"):
        validate_job(unknown, 2)


def test_compile_with_tensor_parallelism_is_refused_in_one_line() -> None:
    """torch.compile of TP blocks gives other gradients / fails in backward with this torch: refused up front."""
    from cp_dtensor.config import load_config
    from cp_dtensor.trainer import validate_job

    cfg = load_config(["--config", str(ROOT / "train_configs" / "debug_cp2_tp2.toml"), "--compile.enable"])
    with pytest.raises(
        ValueError, match=r"compile\.enable with tensor_parallel_degree > 1 is not supported yet"
    ):
        validate_job(cfg, 4)


def test_an_unknown_cost_hardware_is_refused_whatever_the_comm() -> None:
    """Issue 25 item 10: accepted and ignored before (comm p2p, or cp 1, never priced)."""
    from cp_dtensor.config import load_config
    from cp_dtensor.trainer import validate_job

    for cp, comm in ((2, "p2p"), (2, "allgather"), (1, "p2p")):
        cfg = load_config(
            ["--parallelism.context_parallel_degree", str(cp), "--parallelism.context_parallel_comm", comm]
        )
        cfg.parallelism.context_parallel_cost_hardware = "h1000"
        with pytest.raises(
            ValueError, match=r"^parallelism\.context_parallel_cost_hardware: Unknown hardware 'h1000'"
        ):
            validate_job(cfg, cp)
        cfg.parallelism.context_parallel_cost_hardware = "h100"  # a preset passes
        validate_job(cfg, cp)


def _resume_under_other_masks(dump: str) -> dict[str, object]:
    """On every rank: 2 causal steps (checkpoint at 2), then resumes under other mask settings."""
    from cp_dtensor.checkpoint import CheckpointError
    from cp_dtensor.trainer import Trainer

    base = _config(
        dump, training={"steps": 2, "seq_len": 64, "local_batch_size": 2}, checkpoint={"interval": 2}
    )
    Trainer(JobConfig.from_dict(base)).train()
    out: dict[str, object] = {}
    changes = {
        "document": {"attention_mask": "document_causal"},
        "window": {"sliding_window": 16, "sliding_window_layers": "alternate"},
    }
    for name, model in changes.items():
        cfg = _config(dump, training={**base["training"], "steps": 3}, model=model)
        try:
            Trainer(JobConfig.from_dict(cfg)).train()
            out[name] = "trained on"
        except CheckpointError as e:
            out[name] = str(e)
    allowed = _config(
        dump, training={**base["training"], "steps": 3}, model=changes["document"],
        checkpoint={"interval": 2, "allow_mask_change": True},
    )  # fmt: skip
    trainer = Trainer(JobConfig.from_dict(allowed))
    lines: list[str] = []
    trainer.metrics.info = lines.append  # collect the log lines of this instance
    out["allowed"] = (len(trainer.train()), [line for line in lines if line.startswith("warning")])
    return out


def test_resuming_under_another_attention_mask_is_refused_unless_allowed(tmp_path: Path, dist_pool) -> None:
    """Issue 25 item 4: before, a resume with another mask or window trained on without a word."""
    for rank_out in dist_pool(2).run(_resume_under_other_masks, str(tmp_path)):
        document, window = rank_out["document"], rank_out["window"]
        assert "\n" not in document and re.search(
            r"was trained with another attention mask: model\.attention_mask 'causal' in the checkpoint, "
            r"'document_causal' now; resume with --model\.attention_mask causal, or set "
            r"checkpoint\.allow_mask_change = true",
            document,
        ), document
        assert (
            "model.sliding_window 0 in the checkpoint, 16 now, model.sliding_window_layers 'all' in the "
            "checkpoint, 'alternate' now" in window
        ), window
        steps, warnings = rank_out["allowed"]
        assert steps == 1  # step 3 trained after one warning line
        assert len(warnings) == 1 and "continuing under the new mask" in warnings[0], warnings


def test_reset_positions_with_documents_and_a_window_train_equal_at_cp1_and_cp2(
    tmp_path: Path, dist_pool
) -> None:
    """What the config reference claims for data.reset_positions (issue 25 item 10): per-document RoPE
    positions under the document mask and a sliding window give the losses of a run without CP."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"doc {i} " + "fox jumps " * (3 + 7 * (i % 4))}) + "\n" for i in range(40)
        )
    )
    common = {
        "model": {"attention_mask": "document_causal", "sliding_window": 24},
        "data": {"dataset": "text", "paths": [str(corpus)], "reset_positions": True},
        "checkpoint": {"enable": False},
    }
    cp2 = _config(str(tmp_path / "cp2"), training={"steps": 4, "local_batch_size": 2}, **common)
    cp1 = _config(
        str(tmp_path / "cp1"), training={"steps": 4, "local_batch_size": 1},
        parallelism={"context_parallel_degree": 1, "data_parallel_degree": 2}, **common,
    )  # fmt: skip
    want = dist_pool(2).run(run_trainer, cp1)[0]
    _assert_losses_match(dist_pool(2).run(run_trainer, cp2)[0], want, LOSS_RTOL)


def _train_with_validation(cfg: dict) -> tuple[list[float], list[tuple[int, float]]]:
    from cp_dtensor.trainer import Trainer

    trainer = Trainer(JobConfig.from_dict(cfg))
    losses = [r.loss for r in trainer.train()]
    return losses, trainer.validation_losses


def test_validation_loss_is_the_same_at_cp1_cp2_pp2_and_tp2(tmp_path: Path, dist_pool) -> None:
    """Issue 24 item 2: validation every 2 steps, forward only under the job's layout; the loss per token of
    the held-out batches equals the run without CP (cp1 x dp2) within LOSS_RTOL, also under pp2 and tp2. Each pair
    reads the same global batches (cp2: 2 rows on one dp rank; dp2: 1 row on each of two)."""
    train, held_out = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(
        "".join(json.dumps({"text": f"doc {i} " + "fox jumps " * (3 + i % 9)}) + "\n" for i in range(60))
    )
    held_out.write_text(
        "".join(json.dumps({"text": f"held {i} " + "dog naps " * (2 + i % 7)}) + "\n" for i in range(30))
    )
    data = {"dataset": "text", "paths": [str(train)]}
    validation = {"enable": True, "freq": 2, "steps": 2, "paths": [str(held_out)]}
    runs = {
        "cp2": ({"context_parallel_degree": 2}, 2, {"seq_len": 64, "local_batch_size": 2}),
        "dp2": (
            {"context_parallel_degree": 1, "data_parallel_degree": 2},
            1,
            {"seq_len": 64, "local_batch_size": 1},
        ),
        "cp2_full": ({"context_parallel_degree": 2}, 2, {}),
        "pp2": ({"context_parallel_degree": 1, "pipeline_parallel_degree": 2}, 2, {}),
        "tp2": ({"context_parallel_degree": 1, "tensor_parallel_degree": 2}, 2, {}),
    }
    got = {}
    for name, (parallelism, rows, shape) in runs.items():
        cfg = _config(
            str(tmp_path / name), training={"steps": 4, "local_batch_size": rows}, parallelism=parallelism,
            data=data, validation={**validation, **shape}, checkpoint={"enable": False},
            model={"attention_mask": "document_causal"},
        )  # fmt: skip
        got[name] = dist_pool(2).run(_train_with_validation, cfg)[0]
    for name, reference in (("cp2", "dp2"), ("pp2", "cp2_full"), ("tp2", "cp2_full")):
        (losses, val), (want_losses, want_val) = got[name], got[reference]
        assert [s for s, _ in val] == [s for s, _ in want_val] == [2, 4]
        _assert_losses_match([v for _, v in val], [v for _, v in want_val], LOSS_RTOL, [2, 4])
        _assert_losses_match(losses, want_losses, LOSS_RTOL)
    assert got["cp2"][1][0][1] > got["cp2"][1][1][1]  # training lowers the held-out loss too
    records = [json.loads(line) for line in (tmp_path / "cp2" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r] == got["cp2"][1]


def test_validation_log_line_and_config_checks(tmp_path: Path, capsys) -> None:
    from cp_dtensor.config import ConfigError, load_config
    from cp_dtensor.metrics import MetricsLogger

    log = MetricsLogger(
        is_rank0=True, total_steps=10, log_freq=5, log_file=tmp_path / "log.jsonl", progress=False
    )
    log.log_validation(4, 2.5, 1024, 0.5)
    log.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("validation step  4/10 | loss 2.5000 | tokens 1,024"), line
    assert json.loads((tmp_path / "log.jsonl").read_text()) == {
        "step": 4, "validation_loss": 2.5, "validation_tokens": 1024, "validation_time_s": 0.5,
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"^validation\.paths: validation\.enable needs held-out files"):
        load_config(["--validation.enable"])
    on = [
        "--validation.enable",
        "--validation.paths",
        "v.jsonl",
        "--parallelism.context_parallel_degree",
        "2",
    ]
    with pytest.raises(ConfigError, match=r"validation\.seq_len"):
        load_config([*on, "--validation.seq_len", "6"])  # zigzag at cp 2 needs a multiple of 4
    with pytest.raises(ConfigError, match=r"must equal training's .* under pipeline parallelism"):
        load_config([*on, "--validation.seq_len", "64", "--parallelism.pipeline_parallel_degree", "2",
                     "--training.local_batch_size", "2"])  # fmt: skip


def _child_peak_memory_bytes() -> int:
    from cp_dtensor.metrics import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu"))


def test_cpu_peak_memory_of_a_spawned_rank_is_its_own() -> None:
    """The log's "mem" on CPU: getrusage's ru_maxrss survives exec, so a spawned rank reported at least its
    launcher's memory (measured: a child of an 800 MiB parent reported 815 MiB while holding 15 MiB)."""
    import multiprocessing as mp

    held = bytearray(1536 * 2**20)  # the launcher holds 1.5 GiB when it starts the rank
    held[::4096] = b"\1" * len(held[::4096])  # touch every page
    with mp.get_context("spawn").Pool(1) as pool:
        child = pool.apply(_child_peak_memory_bytes)
    del held
    assert 50 * 2**20 < child < 1024 * 2**20, child / 2**20  # its own imports (torch), not the 1.5 GiB


def test_cp_work_imbalance_in_the_log_is_the_largest_over_dp_ranks(tmp_path: Path, dist_pool) -> None:
    """dp2 x cp2 on packed documents with the zigzag layout: the logged ``cp work max/mean`` of each step is
    the larger of the two dp ranks' values, computed here from each dp rank's rows (it used to be dp rank 0's
    alone, which the test checks differs from the logged value at some step)."""
    from cp_dtensor.attention.mask import AttentionMask
    from cp_dtensor.balance import layout_work, to_sequence_layout
    from cp_dtensor.models.llama import LLAMA3_FLAVORS
    from cp_dtensor.trainer import _build_data
    from cp_dtensor.trainer.builders import DataPlacement

    corpus = tmp_path / "docs.jsonl"
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 60, (200,), generator=gen).tolist()
    corpus.write_text("".join(json.dumps({"text": "w" * n}) + "\n" for n in lengths))
    cfg = _config(
        str(tmp_path / "run"), training={"steps": 3, "local_batch_size": 2, "global_batch_size": 4},
        parallelism={"context_parallel_degree": 2, "data_parallel_degree": 2, "context_parallel_layout": "zigzag"},
        data={"dataset": "text", "paths": [str(corpus)]}, model={"attention_mask": "document_causal"},
        checkpoint={"enable": False},
    )  # fmt: skip
    dist_pool(4).run(run_trainer, cfg)
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    logged = [json.loads(line)["cp_work_imbalance"] for line in log]
    job = JobConfig.from_dict(cfg)
    per_dp = []  # per dp rank: its rows' work max/mean at each step
    for dp_rank in range(2):
        placement = DataPlacement(dp_rank=dp_rank, dp_degree=2)
        loader = _build_data(job, LLAMA3_FLAVORS["debug"].vocab_size, 4, placement).loader
        values = []
        for step in range(3):
            rows = loader.get_batch(step)
            mask = AttentionMask(True, (-1, -1), rows["document_ids"])  # the debug model is causal
            work = layout_work(to_sequence_layout("zigzag", 2, batch=2, seq_len=128), mask)
            values.append(float(work.max() / work.float().mean()))
        per_dp.append(values)
    assert logged == pytest.approx([max(a, b) for a, b in zip(*per_dp)], rel=1e-12)
    assert logged != pytest.approx(per_dp[0], rel=1e-12)  # dp rank 0's rows alone would log another value
    assert LLAMA3_FLAVORS["debug"].causal


def _build_data_for(job: JobConfig, placement) -> object:
    from cp_dtensor.models.llama import LLAMA3_FLAVORS
    from cp_dtensor.trainer import _build_data

    return _build_data(
        job, LLAMA3_FLAVORS["debug"].vocab_size, job.training.global_batch_size, placement
    ).loader
