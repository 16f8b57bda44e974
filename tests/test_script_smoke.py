"""Tiny smoke runs of the report scripts: the harness works end to end (not timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_train_smoke(tmp_path: Path) -> None:
    out, png = tmp_path / "train.json", tmp_path / "train.png"
    proc = _run(
        "scripts/bench_train.py", "--flavor", "debug", "--seq-len", "256", "--steps", "1", "--warmup", "0",
        "--layouts", "tp2+full", "cp2", "--json", str(out), "--plot", str(png), "--hw", "cpu",
    )  # fmt: skip
    assert "| tp2+full | 2 |" in proc.stdout and "| cp2 | 2 |" in proc.stdout
    assert "Predicted with hardware 'cpu' (--hw cpu)" in proc.stdout  # the planner's prediction per plan
    rows = json.loads(out.read_text())["measurements"]
    assert [r["layout"]["tp"] for r in rows] == [2, 1] and all(r["activation_bytes"] > 0 for r in rows)
    assert png.read_bytes()[:4] == b"\x89PNG"
    # The planner reads it back as a calibration file and states its error.
    plan = _run("scripts/plan.py", "--hw", "cpu", "--model", "debug", "--calibrate-from", str(out))
    assert "measured" in plan.stdout


def test_show_sharding_smoke() -> None:
    proc = _run("scripts/show_sharding.py", "--cp", "2", "--seq-len", "32")
    assert "layers.0.attention.sdpa" in proc.stdout and "# CP attention: every SDPA" in proc.stdout
    # the hidden state between blocks: a DTensor sequence-sharded over cp
    assert "out      [cp:S(1) tp:R] (2, 16, 64)/(2, 32, 64)" in proc.stdout


def test_activation_memory_smoke() -> None:
    proc = _run(
        "scripts/activation_memory.py",
        "--flavor",
        "debug",
        "--seq-len",
        "256",
        "--cps",
        "1",
        "2",
        "--ac",
        "none",
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| none |")]
    assert len(lines) == 2
    ratio = float(lines[1].split("|")[4])
    assert 0.45 < ratio < 0.6  # cp2 keeps about half of cp1's activations per rank


def test_bench_strategies_and_plan_strategies_smoke() -> None:
    proc = _run(
        "scripts/bench_strategies.py", "--cp", "2", "--seq-len", "256", "--kv-heads", "2", "--repeats", "1",
        "--a2a-size", "1",
    )  # fmt: skip
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert [r.split("|")[2].strip().split(" ->")[0] for r in rows] == [
        "p2p", "allgather", "alltoall", "hybrid 1 x 2", "auto",
    ]  # fmt: skip
    assert all(float(r.split("|")[-2]) < 1e-4 for r in rows)  # max abs error vs fp64 SDPA
    plan = _run(
        "scripts/plan.py", "--strategies", "--model", "llama3_8b", "--seq", "32768", "--cp", "8", "32"
    )
    assert "| 32K | 1 x 32 | **hybrid(8)** |" in plan.stdout


def test_ring_profile_smoke() -> None:
    proc = _run("scripts/ring_profile.py", "--cp", "2", "--seq-len", "256", "--repeats", "1")
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 2 |"))
    shares = [float(x) for x in row.strip("|").split("|")[2:]]
    assert len(shares) == 7 and abs(sum(shares) - 100) < 1.0 and shares[0] > 0  # the parts add up


def test_bench_sft_data_smoke(tmp_path: Path) -> None:
    proc = _run("scripts/bench_sft_data.py", "--sizes-mb", "0.2", "--seq-len", "512", "--dir", str(tmp_path))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 0 |"))
    records, samples = (int(cell.replace(",", "")) for cell in row.split("|")[2:4])
    assert records > 200 and samples > 100  # records of ~700 bytes: about one per 512-token sample
