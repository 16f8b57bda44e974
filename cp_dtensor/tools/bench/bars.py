"""The project's performance bars for cp_dtensor's p2p zigzag ring, checked against one run's metrics.

The bars::

  efficiency T_single / (CP x T_cp)                  >= EFFICIENCY_BAR (when ranks do not outnumber cores)
  efficiency above PyTorch's loop (all-to-all)       > 0
  CPU seconds of all ranks / single process          <= CPU_RATIO_BAR (when ranks outnumber cores)
  bytes sent per rank / theoretical minimum          within BYTES_BAR of 1
  causal zigzag work max/mean over ranks             <= WORK_BAR
  saved-for-backward bytes per rank                  <= SAVED_BAR x CP1 / CP + lse
"""

from __future__ import annotations

from typing import Any

from cp_dtensor.tools.bench.config import BenchConfig
from cp_dtensor.tools.bench.machine import machine_facts
from cp_dtensor.tools.bench.report import format_bytes
from cp_dtensor.tools.bench.timing import summarize

__all__ = ["BYTES_BAR", "CPU_RATIO_BAR", "EFFICIENCY_BAR", "SAVED_BAR", "WORK_BAR", "check_bars"]

EFFICIENCY_BAR = 0.97
CPU_RATIO_BAR = 1.05
BYTES_BAR = 0.01
WORK_BAR = 1.02
SAVED_BAR = 1.05


def check_bars(cfg: BenchConfig, res: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's performance bars for this run, each with the measured figure and pass/fail.

    Args:
        cfg: the run's configuration.
        res: one sequence length's metrics; receives ``paired_step_diff_vs_torch_alltoall_s`` when
            PyTorch's all-to-all loop ran.

    Returns:
        One ``{"bar", "value", "target", "pass", "note"}`` per bar (``pass`` None: informational); empty
        when cpd_p2p_zigzag did not run.
    """
    checks: list[dict[str, Any]] = []
    vs = res["variants"]
    ours = vs.get("cpd_p2p_zigzag")
    if ours is None:
        return checks

    def add(name: str, value: float, target: str, ok: bool | None, note: str = "") -> None:
        checks.append({"bar": name, "value": value, "target": target, "pass": ok, "note": note})

    eff = ours["efficiency"]
    cores = machine_facts()["usable_cores"] or 0
    oversubscribed = cfg.cp > cores
    ceiling = vs.get("sdpa_cp_threads")
    eff_note = (
        f"machine ceiling: single-process SDPA with {cfg.cp} threads reaches {ceiling['efficiency']:.3f}"
        if ceiling
        else ""
    )
    if oversubscribed:
        eff_note = f"informational: {cfg.cp} ranks on {cores} cores, wall time says little"
    add(
        "p2p zigzag efficiency",
        eff,
        f">= {EFFICIENCY_BAR}",
        None if oversubscribed else eff >= EFFICIENCY_BAR,
        eff_note,
    )
    if "torch_ring_alltoall" in vs:
        theirs = vs["torch_ring_alltoall"]["efficiency"]
        pairs = zip(ours["time_s"]["values"], vs["torch_ring_alltoall"]["time_s"]["values"])
        paired = summarize([x - y for x, y in pairs])
        res["paired_step_diff_vs_torch_alltoall_s"] = paired.as_dict()
        add(
            "p2p zigzag efficiency > PyTorch loop (all-to-all)",
            eff - theirs,
            "> 0",
            eff > theirs,
            f"PyTorch {theirs:.3f}; per-round paired step difference ours - PyTorch: median "
            f"{paired.median * 1e3:+.1f} ms [IQR {paired.q1 * 1e3:+.1f}, {paired.q3 * 1e3:+.1f}]",
        )
    ratio = ours["cpu_ratio_vs_single"]
    add(
        "CPU seconds all ranks / single process",
        ratio,
        f"<= {CPU_RATIO_BAR}",
        ratio <= CPU_RATIO_BAR if oversubscribed else None,
        f"CP={cfg.cp} ranks on {cores} cores"
        if oversubscribed
        else f"informational: the bar is for ranks outnumbering cores ({cfg.cp} ranks, {cores} cores)",
    )
    worst = max(ours["bytes_forward_vs_min"], ours["bytes_backward_vs_min"])
    add("bytes sent per rank / minimum", worst, f"<= {1 + BYTES_BAR}", abs(worst - 1) <= BYTES_BAR)
    if cfg.causal:
        w = ours["work_forward_max_over_mean"]
        add("causal zigzag work max/mean", w, f"<= {WORK_BAR}", w <= WORK_BAR)
    saved = ours["saved_bytes_vs_target"]
    add(
        "saved-for-backward bytes per rank / (1.05 x CP1/CP + lse)",
        saved,
        "<= 1",
        saved <= 1.0,
        f"{format_bytes(ours['saved_bytes_per_rank'])} vs CP=1 {format_bytes(res['cp1_saved_bytes'])}",
    )
    return checks
