"""Efficiency and median step time against the global sequence length, as a PNG (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cp_dtensor.tools.bench.bars import EFFICIENCY_BAR

__all__ = ["plot_results"]


def plot_results(report: dict[str, Any], path: Path) -> None:
    """Efficiency and median step time against S; matplotlib is imported only here.

    Args:
        report: the JSON report of a CPU run (``config``, ``machine``, ``results``).
        path: where the PNG goes.

    Raises:
        SystemExit: matplotlib is not installed (with the command that installs it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise SystemExit(
            f"--plot needs matplotlib ({e}); install it with `pip install matplotlib` or "
            f"`pip install -e '.[plot]'`, or run without --plot."
        ) from None
    results = report["results"]
    seq = [r["seq_len"] for r in results]
    names = list(results[0]["variants"])
    fig, (ax_eff, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        eff = [r["variants"][name]["efficiency"] for r in results]
        t = [r["variants"][name]["time_s"]["median"] for r in results]
        if name != "sdpa_1thread":
            ax_eff.plot(seq, eff, marker="o", color=colors(i), label=name)
        ax_t.plot(seq, t, marker="o", color=colors(i), label=name)
    cfg = report["config"]
    ax_eff.axhline(EFFICIENCY_BAR, color="gray", ls="--", lw=1, label=f"bar {EFFICIENCY_BAR}")
    ax_eff.set(
        xlabel="global sequence length S",
        ylabel="efficiency T1 / (CP x T)",
        xscale="log",
        title="parallel efficiency",
    )
    ax_t.set(
        xlabel="global sequence length S",
        ylabel="fwd+bwd step time (s, median)",
        xscale="log",
        yscale="log",
        title="step time",
    )
    for ax in (ax_eff, ax_t):
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(seq, [str(s) for s in seq])
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(
        f"CP={cfg['cp']} B={cfg['batch']} Hq={cfg['heads']} Hkv={cfg['kv_heads']} D={cfg['head_dim']} {cfg['dtype']} "
        f"{'causal' if cfg['causal'] else 'bidirectional'} - {report['machine']['cpu_model']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
