"""Reliability: failing ranks end the job quickly, checkpoints survive crashes, NaNs are caught, runs repeat.

Every case runs ``train.py`` (directly, or through tests/faults/run_with_fault.py which injects one fault)
as a subprocess with local CPU ranks, and bounds its wall time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAULT = ROOT / "tests" / "faults" / "run_with_fault.py"
EXIT_BOUND_S = 30.0  # after a fault, the whole job must be gone within this


def _args(dump: Path, *extra: str, cp: int = 2, dp: int = 1, steps: int = 6) -> list[str]:
    return [
        "--model.flavor", "debug", "--training.seq_len", "128", "--training.local_batch_size", "2",
        "--training.steps", str(steps), "--training.warmup_steps", "0", "--metrics.log_freq", "1",
        "--parallelism.context_parallel_degree", str(cp), "--parallelism.data_parallel_degree", str(dp),
        "--timeouts.train_seconds", "20", f"--job.dump_folder={dump}", *extra,
    ]  # fmt: skip


def _run(argv: list[str], fault: tuple[str, int, int] | None = None, timeout: float = 240) -> tuple:
    prefix = [str(FAULT), fault[0], str(fault[1]), str(fault[2]), "--"] if fault else ["train.py"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *prefix, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - t0


def _losses(dump: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (dump / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


def test_a_rank_that_raises_ends_the_job_with_its_name(tmp_path: Path) -> None:
    proc, _ = _run(_args(tmp_path, cp=2, dp=2, steps=200), fault=("raise", 2, 3))
    assert proc.returncode == 1
    first = proc.stderr.strip().splitlines()[0]
    assert first == "error: rank 2: RuntimeError: injected fault on rank 2 at step 3", proc.stderr[-2000:]
    assert "Traceback" in proc.stderr  # an unexpected error keeps the failing rank's traceback (only)
    assert proc.stderr.count("Traceback") == 1
    assert max(_losses(tmp_path)) == 2  # steps 1 and 2 ran


def test_a_hanging_rank_makes_the_others_time_out(tmp_path: Path) -> None:
    args = _args(tmp_path, cp=2, dp=2, steps=200)
    args[args.index("--timeouts.train_seconds") + 1] = "5"
    proc, elapsed = _run(args, fault=("hang", 1, 3))
    assert proc.returncode == 1
    # The others fail in their collective after the 5 s timeout; the silent rank is stopped by the launcher.
    first = proc.stderr.splitlines()[0]
    assert "Timed out waiting 5000ms" in first, proc.stderr[-2000:]
    assert "rank(s) [1] had not exited and were stopped" in first
    assert elapsed < 120


def _rank_pids(parent: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    ranks = []
    for pid in kids:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            ranks.append(pid)
    return ranks


def test_a_killed_rank_ends_the_job_within_the_bound(tmp_path: Path) -> None:
    cmd = [sys.executable, "train.py", *_args(tmp_path, cp=2, dp=2, steps=10_000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = tmp_path / "train_log.jsonl"
        deadline = time.monotonic() + 180
        while not (log.exists() and log.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 4, ranks
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=EXIT_BOUND_S)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert elapsed < EXIT_BOUND_S
    assert "was killed by signal SIGKILL" in err.strip().splitlines()[0], err[-2000:]
    for pid in ranks:  # no orphans left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    args = _args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "2", steps=6)
    proc, _elapsed = _run(args, fault=("crash_in_save", 1, 4))
    assert proc.returncode == 1 and "rank 1 was killed by signal SIGKILL" in proc.stderr, proc.stderr[-2000:]
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == [".step-4.tmp", "step-2"]  # nothing half-published
    proc, _ = _run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(step 2)" in proc.stdout  # resumed from the last good checkpoint
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-2",
        "step-4",
        "step-6",
    ]  # the stale .tmp is gone


def test_corrupt_checkpoint_is_detected_and_skipped(tmp_path: Path) -> None:
    args = _args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "2", steps=4)
    proc, _ = _run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shard = next(p for p in (tmp_path / "checkpoint" / "step-4").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])  # a torn write
    proc, _ = _run(_args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "2", steps=6))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        f"checkpoint {tmp_path}/checkpoint/step-4 is unusable: file {shard.name} has 100 bytes" in proc.stdout
    )
    assert "(step 2)" in proc.stdout


def test_resuming_another_model_or_a_finished_run_is_one_line(tmp_path: Path) -> None:
    proc, _ = _run(_args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "2", steps=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The resumes run on 1 rank: the fingerprint does not depend on the degrees (DCP reshards on load).
    args = _args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "2", steps=2, cp=1)
    # Another flavor: refused before DCP reads a tensor, in one line naming both models and a difference.
    proc, _ = _run([*args, "--model.flavor", "debug_mha"])
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: checkpoint {tmp_path}/checkpoint/step-2 was saved for model llama3/debug, not llama3/debug_mha: "
        "layers.0.attention.wk.weight has shape (32, 64) in the checkpoint, (64, 64) here (and 3 more "
        "difference(s)); resume with --model.flavor debug, or set another checkpoint.folder (or job.dump_folder) "
        "to start fresh"
    ), proc.stderr[-2000:]
    # training.steps already reached: one line, exit 0, nothing trained or saved.
    proc, _ = _run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint step 2 >= training.steps 2: nothing to train; raise training.steps to continue" in (
        proc.stdout
    )
    assert not any(line.startswith("step") for line in proc.stdout.splitlines())
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-2"]
    # A checkpoint without a fingerprint (saved before they existed): DCP's error, one line, no traceback.
    manifest = tmp_path / "checkpoint" / "step-2" / "manifest.json"
    manifest.write_text(
        json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "fingerprint"})
    )
    proc, _ = _run([*args, "--model.flavor", "debug_mha"])
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: no usable checkpoint in {tmp_path}/checkpoint (tried steps [2]); remove the folder to start fresh"
    ), proc.stderr[-2000:]
    assert (
        "DCP could not read it: ValueError: Size mismatch between saved torch.Size([32, 64])" in proc.stdout
    )


def test_fingerprint_mismatch_names_the_first_difference() -> None:
    from cp_dtensor.checkpoint import fingerprint_mismatch

    saved = {"params": {"a": [2, 3], "b": [4], "c": [1]}}
    assert fingerprint_mismatch(saved, {"params": {"a": [2, 3], "b": [4], "c": [1]}}) is None
    assert fingerprint_mismatch(saved, {"params": {"a": [2, 3], "b": [5], "d": [1]}}) == (
        "b has shape (4,) in the checkpoint, (5,) here; d is not in the checkpoint; the checkpoint has c, this "
        "model does not"
    )


def test_keep_latest_k(tmp_path: Path) -> None:
    args = _args(
        tmp_path, "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2"
    )
    proc, _ = _run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-5", "step-6"]


def test_nan_loss_stops_the_run_naming_the_step_and_saves_nothing_bad(tmp_path: Path) -> None:
    args = _args(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "1")
    proc, _ = _run(args, fault=("nan", 0, 4))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]  # one line
    assert "step 4: non-finite loss nan" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-1", "step-2", "step-3"]


def test_nan_loss_with_skip_drops_the_update_and_goes_on(tmp_path: Path) -> None:
    proc, _ = _run(_args(tmp_path, "--training.on_nonfinite", "skip"), fault=("nan", 0, 4))
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = _losses(tmp_path)
    assert logged[4]["skipped"] and not any(logged[s]["skipped"] for s in (1, 2, 3, 5, 6))
    assert "SKIPPED (non-finite)" in proc.stdout


def test_deterministic_runs_are_bit_identical(tmp_path: Path) -> None:
    losses = []
    for name in ("a", "b"):
        proc, _ = _run(_args(tmp_path / name, "--training.deterministic"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses.append([r["loss"] for _, r in sorted(_losses(tmp_path / name).items())])
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--parallelism.tensor_parallel_degree", "4"], "tensor_parallel_degree 4 must divide n_heads 4 and n_kv_heads 2"),
        (["--parallelism.pipeline_parallel_degree", "4", "--training.local_batch_size", "4",
          "--parallelism.context_parallel_degree", "1"], "needs 4 stages but flavor 'debug' has only 2 layers"),
        (["--training.seq_len", "130"], "training.seq_len=130 must be a multiple of 4"),
        (["--training.seq_len", "1000000000"], "training.seq_len 1000000000 exceeds max_seq_len 131072 of model flavor 'debug'"),
        (["--model.flavor", "8B", "--training.seq_len", "131072", "--training.local_batch_size", "64"],
         "of activations per rank (local_batch_size 64 x seq_len 131072 / context_parallel_degree 2, flavor '8B'"),
        (["--data.dataset", "text", "--data.paths", "/no/such/file.txt"], "data.paths: /no/such/file.txt does not exist"),
        (["--training.steps", "0"], "training.steps: must be >= 1, got 0"),
        (["--training.stpes", "3"], "training.stpes"),
        (["--training.lr", "fast"], "training.lr: expected float"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_process_starts(
    tmp_path: Path, extra: list[str], message: str, capsys, monkeypatch
) -> None:
    from cp_dtensor.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(_args(tmp_path) + extra) == 2  # validation happens in the launching process, before spawning
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and message in err, err
    assert not (tmp_path / "train_log.jsonl").exists()


def test_a_tight_memory_estimate_is_one_warning_line_before_any_process_starts(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import cp_dtensor.cli as cli
    import cp_dtensor.trainer as trainer
    import cp_dtensor.trainer.checks as checks

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = cli.load_config(_args(tmp_path))
    need = trainer.activation_bytes_per_rank(cfg, trainer.validate_job(cfg, 2), trainer.model_args_for(cfg))
    monkeypatch.setattr(  # validate_job measures the machine through its own module's name
        checks, "local_memory_budget", lambda world: trainer.MemoryBudget(1.25 * need, "a test GPU")
    )
    launched = []
    monkeypatch.setattr(cli, "run_distributed", lambda *a, **k: launched.append(a[1]))
    assert cli.main(_args(tmp_path)) == 0
    err = capsys.readouterr().err.strip()
    assert (
        err.splitlines() == [err] and err.startswith("warning: one step keeps ~") and "80% of the" in err
    ), err
    assert launched == [2]  # a warning, not a refusal: the job still starts


def test_world_size_mismatch_under_a_launcher_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", *_args(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: pp * dp * cp * tp = 1 * 1 * 2 * 1 = 2 does not equal the world size 3; change the degrees or "
        "set dp = -1 to infer it."
    ), proc.stderr


def test_ranks_end_without_teardown_and_lose_no_output(tmp_path: Path) -> None:
    """Note [Ending a rank]: five torchrun ranks leave a live gloo group and end with ``end_process``:
    exit code 0 and no abort, and every logged and printed line (written only by a flush) is kept.

    Ending through interpreter teardown instead aborted a rank in 0-7 of 10 runs of such scripts here
    (rate depends on the script's shape), so this test catches a regression in some runs, not every run;
    the flush checks hold in every run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "end"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "5"]
    proc = subprocess.run(
        [*launcher, "--master-port", str(port), str(ROOT / "tests" / "faults" / "end_rank.py"), str(log)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    for rank in range(5):
        assert f"rank {rank} done" in proc.stdout
        assert (tmp_path / f"end.{rank}").read_text() == f"rank {rank}\n"
