"""Smoke tests of the benchmark harness (scripts/bench_attention.py and its library cp_dtensor.tools.bench).

It runs and reports; no timing is asserted.

One tiny run (CP=4 spawned ranks, so ring steps >= 2 run too; S=256, GQA 8/2 heads, 2 repeats) is shared by
the tests of this module.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_attention.py"
CP, SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM = 4, 256, 8, 2, 64
VARIANTS = (
    "cpd_p2p_zigzag",
    "cpd_allgather_zigzag",
    "cpd_p2p_contiguous",
    "torch_ring_alltoall",
    "torch_ring_allgather",
    "sdpa_1thread",
    "sdpa_cp_threads",
)
CP_VARIANTS = VARIANTS[:5]
# fp32 ring vs one SDPA call: the same kernel on blocks, merged by lse in fp32; differences are rounding
# of a few ulps of O(1) values summed over <= 256 keys.
FP32_TOL = 1e-4
_TRANSIENT_LAUNCH_ERRORS = ("EADDRINUSE", "address already in use", "Address already in use")


def _load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (registered, so its dataclasses resolve their module)."""
    if name in sys.modules:
        return sys.modules[name]
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """Run the benchmark once as a user would; return the finished process and its JSON report."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--cp",
        str(CP),
        "--seq-len",
        str(SEQ_LEN),
        "--heads",
        str(HEADS),
        "--kv-heads",
        str(KV_HEADS),
        "--head-dim",
        str(HEAD_DIM),
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    if proc.returncode != 0 and any(m in proc.stderr for m in _TRANSIENT_LAUNCH_ERRORS):
        # run_distributed picks a free port and binds it later; another process may take it meanwhile.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"benchmark failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def test_table_lists_every_variant_and_header(
    smoke_run: tuple[subprocess.CompletedProcess, dict[str, Any]],
) -> None:
    proc, _ = smoke_run
    stdout = proc.stdout
    assert "command: `" in stdout and "bench_attention.py" in stdout
    assert "torch 2." in stdout and "cores" in stdout and "UTC" in stdout
    for name in VARIANTS:
        assert f"| {name} " in stdout, f"variant {name} missing from the table"
    assert "hidden = 1 - median(a - b) / c" in stdout  # the overlap formula is explained


def test_json_has_the_fields(smoke_run: tuple[subprocess.CompletedProcess, dict[str, Any]]) -> None:
    _, report = smoke_run
    assert {"command", "machine", "config", "results"} <= report.keys()
    assert {"cpu_count", "torch", "date_utc"} <= report["machine"].keys()
    (res,) = report["results"]
    assert res["seq_len"] == SEQ_LEN and set(res["variants"]) == set(VARIANTS)
    assert res["head_tail_equals_zigzag"] is True
    for name, m in res["variants"].items():
        assert {"time_s", "speedup", "efficiency", "cpu_s_all_ranks", "cpu_ratio_vs_single"} <= m.keys(), name
        assert m["time_s"]["n"] == 2 and m["time_s"]["min"] <= m["time_s"]["median"] <= m["time_s"]["max"]
        assert math.isclose(m["efficiency"], m["speedup"] / CP)
    for name in CP_VARIANTS:
        m = res["variants"][name]
        for key in (
            "bytes_forward_per_rank",
            "bytes_backward_per_rank",
            "saved_bytes_per_rank",
            "work_forward_max_over_mean",
            "overlap",
        ):
            assert key in m, (name, key)
        o = m["overlap"]
        assert 0.0 <= o["hidden_fraction"] <= 1.0 or math.isnan(o["hidden_fraction"])
        assert o["c_comm_only_s"]["n"] == 2
    assert {c["bar"] for c in res["checks"]} >= {"p2p zigzag efficiency", "bytes sent per rank / minimum"}


def test_our_bytes_equal_the_theoretical_minimum(
    smoke_run: tuple[subprocess.CompletedProcess, dict[str, Any]],
) -> None:
    _, report = smoke_run
    (res,) = report["results"]
    s_local = SEQ_LEN // CP
    kv_shard = 2 * KV_HEADS * s_local * HEAD_DIM * 4  # K + V of Hkv heads, fp32
    assert res["min_bytes_per_rank"] == {
        "forward": (CP - 1) * kv_shard,
        "backward": (CP - 1) * 2 * kv_shard,  # KV again + fp32 dK/dV
        "kv_shard": kv_shard,
        "dkv_shard": kv_shard,
    }
    for name in ("cpd_p2p_zigzag", "cpd_allgather_zigzag", "cpd_p2p_contiguous"):
        for fwd, bwd in res["variants"][name]["bytes_per_rank_all"]:
            assert (fwd, bwd) == (
                res["min_bytes_per_rank"]["forward"],
                res["min_bytes_per_rank"]["backward"],
            ), name
    # PyTorch's loop: counted bytes agree with what its code does (dK/dV rotated CP times, not CP-1).
    for name in ("torch_ring_alltoall", "torch_ring_allgather"):
        m = res["variants"][name]
        assert (m["bytes_forward_per_rank"], m["bytes_backward_per_rank"]) == (
            m["bytes_analytic"]["forward"],
            m["bytes_analytic"]["backward"],
        )


def test_outputs_match_across_variants(smoke_run: tuple[subprocess.CompletedProcess, dict[str, Any]]) -> None:
    _, report = smoke_run
    (res,) = report["results"]
    for name in (*CP_VARIANTS, "sdpa_cp_threads"):
        diffs = res["variants"][name]["max_abs_diff_vs_sdpa"]
        assert set(diffs) == {"out", "dq", "dk", "dv"}
        assert max(diffs.values()) < FP32_TOL, (name, diffs)
    for name in CP_VARIANTS:
        assert max(res["variants"][name]["max_abs_diff_vs_cpd_p2p_zigzag"].values()) < FP32_TOL, name
    # Zigzag balances causal work exactly; contiguous does not.
    assert res["variants"]["cpd_p2p_zigzag"]["work_forward_max_over_mean"] == 1.0
    assert res["variants"]["torch_ring_alltoall"]["work_forward_max_over_mean"] == 1.0
    assert res["variants"]["cpd_p2p_contiguous"]["work_forward_max_over_mean"] > 1.4
    # Ours and PyTorch's loop save the same q, k, v, out, lse: 1/CP of CP=1's bytes.
    ours = res["variants"]["cpd_p2p_zigzag"]["saved_bytes_per_rank"]
    assert ours == res["variants"]["torch_ring_alltoall"]["saved_bytes_per_rank"]
    assert ours * CP == res["cp1_saved_bytes"]


def test_plot_from_report(
    smoke_run: tuple[subprocess.CompletedProcess, dict[str, Any]], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    _, report = smoke_run
    from cp_dtensor.tools.bench.plot import plot_results

    path = tmp_path / "bench.png"
    plot_results(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cuda_path_fails_clearly_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA path would run")
    bench = _load_script("bench_attention")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--device", "cuda", "--seq-len", "256", "--cp", "2"])


def test_common_helpers() -> None:
    from cp_dtensor.tools.bench.overlap import hidden_fraction
    from cp_dtensor.tools.bench.report import markdown_table
    from cp_dtensor.tools.bench.theory import score_elements
    from cp_dtensor.tools.bench.timing import summarize

    assert hidden_fraction(0.0, 1.0) == 1.0
    assert hidden_fraction(2.0, 1.0) == 0.0  # clipped
    assert hidden_fraction(-1.0, 1.0) == 1.0  # clipped
    assert hidden_fraction(0.25, 1.0) == 0.75
    assert math.isnan(hidden_fraction(0.1, 0.0))
    s = summarize([3.0, 1.0, 2.0, 4.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 4.0, 4)
    assert score_elements(1, 2, 4, 4, causal=True) == 2 * 10
    assert score_elements(1, 2, 4, 8, causal=False) == 2 * 32
    assert "| a | b |" in markdown_table(["a", "b"], [[1, 2]])


def test_local_copy_transport_runs_the_ring() -> None:
    """The compute-only stand-in runs cp_dtensor's ring code end to end with the real shapes."""
    from cp_dtensor.attention.kernels import select_kernel
    from cp_dtensor.attention.mask import AttentionMask
    from cp_dtensor.attention.strategy import get_strategy
    from cp_dtensor.tools.bench.standins import LocalCopyTransport

    q, dout = torch.randn(2, 1, 4, 32, 8).unbind(0)
    k, v = torch.randn(2, 1, 2, 32, 8).unbind(0)
    for rank in range(2):
        transport = LocalCopyTransport(rank, 2)
        algo = get_strategy("p2p").build(
            layout="zigzag", mask=AttentionMask(True), rank=rank, cp=2, s_local=32, a2a_size=None, scale=0.5,
            kernel=select_kernel(q.device, q.dtype),
        )  # fmt: skip
        out, lse = algo.forward(q, k, v, transport, **algo.options)
        dq, dk, dv = algo.backward(dout, q, k, v, out, lse, transport, **algo.options)
        assert (
            out.shape == q.shape and lse.shape == q.shape[:3] and dq.shape == q.shape and dk.shape == k.shape
        )
        assert torch.isfinite(dq).all() and torch.isfinite(dv).all()
