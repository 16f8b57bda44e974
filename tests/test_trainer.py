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

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-5  # layouts differ only in summation order (see test_training_parity.py)


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


def test_train_py_end_to_end(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "train.py", "--config", "train_configs/debug_cpu.toml",
        "--training.steps", "12", "--metrics.log_freq", "4", "--checkpoint.enable", "false",
        f"--job.dump_folder={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert [int(re.match(r"step\s+(\d+)/", line).group(1)) for line in lines] == [1, 4, 8, 12]
    losses = [float(re.search(r"loss (\d+\.\d+)", line).group(1)) for line in lines]
    assert losses[-1] < losses[0] - 0.5, losses
    assert "cp 2" in proc.stdout and (tmp_path / "train_log.jsonl").read_text().count("\n") == 4


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
    losses = dist_pool(2).run(run_trainer, cfg)[0]
    chance = 2.772588722239781  # ln(16): the dataset's uniform guess over 16 possible answers
    tail = sum(losses[-10:]) / 10
    assert tail < 0.5 * chance, f"mean loss of the last 10 steps {tail:.3f} vs chance {chance:.3f}"


@pytest.mark.parametrize("path", sorted((ROOT / "train_configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path, tmp_path: Path) -> None:
    from cp_dtensor.cli import local_world_size
    from cp_dtensor.config import load_config
    from cp_dtensor.trainer import validate_job

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    cfg = load_config(["--config", str(path), "--data.paths", str(corpus)])  # GPU configs name a placeholder
    pd = validate_job(cfg, local_world_size(cfg))
    assert pd.world_size == local_world_size(cfg)


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
