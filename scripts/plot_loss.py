#!/usr/bin/env python3
"""Turn training logs (train_log.jsonl written by train.py) into a PNG loss curve.

    python scripts/plot_loss.py outputs/debug_cpu/train_log.jsonl -o loss.png
    python scripts/plot_loss.py runA/train_log.jsonl runB/train_log.jsonl --labels cp1 cp2 -o compare.png
    python scripts/plot_loss.py outputs/debug_cpu/train_log.jsonl --chance 2.7726   # draw the chance level

One line per log file (loss against step; log scale on the loss axis with --log). A log that was appended
to by a resumed run keeps the last record of every step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> tuple[list[int], list[float]]:
    """Steps and losses of a train_log.jsonl (the last record wins for repeated steps)."""
    by_step: dict[int, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "loss" in record:  # validation records carry "validation_loss" instead
                by_step[int(record["step"])] = float(record["loss"])
        except (ValueError, KeyError) as e:
            raise SystemExit(f"error: {path}:{n} is not a train.py log record ({e})") from None
    if not by_step:
        raise SystemExit(f"error: {path} has no log records")
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def main(argv: list[str] | None = None) -> int:
    """Plot the logs; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path, help="train_log.jsonl files")
    p.add_argument("-o", "--output", type=Path, default=Path("loss.png"))
    p.add_argument("--labels", nargs="+", help="one legend label per log (default: the parent folder names)")
    p.add_argument("--chance", type=float, help="draw a horizontal line at this loss (e.g. the chance level)")
    p.add_argument("--log", action="store_true", help="log scale for the loss")
    p.add_argument("--title", default="training loss")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write(
            "error: plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')\n"
        )
        return 1
    labels = args.labels or [path.parent.name for path in args.logs]
    if len(labels) != len(args.logs):
        sys.stderr.write(f"error: {len(args.logs)} logs but {len(labels)} labels\n")
        return 2
    fig, ax = plt.subplots(figsize=(7, 4))
    for path, label in zip(args.logs, labels):
        steps, losses = read_log(path)
        ax.plot(steps, losses, marker="o", markersize=3, label=f"{label} (last {losses[-1]:.3f})")
    if args.chance is not None:
        ax.axhline(args.chance, color="gray", linestyle="--", label=f"chance {args.chance:.3f}")
    if args.log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
