#!/usr/bin/env python3
"""Training throughput on packed documents: document_causal against causal, and the balanced layout.

    python scripts/bench_documents.py                        # CP 2, S 8192, 50 steps per run
    python scripts/bench_documents.py --steps 20 --seq-len 4096 --flavor small

Writes a seeded corpus of documents with long-tailed lengths (log-normal, median ~1K bytes, a few ~30K),
then trains the same model on it with ``train.py`` three times at the same CP degree:

* ``causal`` + zigzag: the documents are packed but attention crosses their boundaries (today's default);
* ``document_causal`` + zigzag: the exact document mask, on the layout that balances one long sequence;
* ``document_causal`` + balanced: the layout planned per batch from the documents.

The table gives the median tokens/s (steps 6..N; the first steps warm up), the attention work imbalance
across CP ranks (max/mean of visible pairs, the ``cp work max/mean`` log field: min / median / max over the
steps) and the bytes CP sent per step. The loss differs between masks (they are different models of the
data); the point is the work the mask saves and how evenly it is spread.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "which",
    "are",
    "this",
    "be",
    "has",
    "had",
]


def write_corpus(path: Path, n_docs: int, seed: int) -> int:
    """A JSONL corpus of ``n_docs`` documents with log-normal lengths; returns the number of bytes."""
    rng = random.Random(seed)
    total = 0
    with path.open("w") as f:
        for _ in range(n_docs):
            n_words = max(3, int(math.exp(rng.gauss(5.3, 1.2))))
            text = " ".join(rng.choice(WORDS) for _ in range(n_words))
            total += len(text)
            f.write(json.dumps({"text": text}) + "\n")
    return total


def run(args: argparse.Namespace, corpus: Path, out: Path, mask: str, layout: str) -> list[dict]:
    """One train.py run; its JSONL metrics."""
    cmd = [
        sys.executable, "train.py", "--config", "train_configs/debug_cpu.toml",
        "--model.flavor", args.flavor, "--model.attention_mask", mask,
        "--parallelism.context_parallel_degree", str(args.cp), "--parallelism.context_parallel_layout", layout,
        "--data.dataset", "text", "--data.paths", str(corpus),
        "--training.seq_len", str(args.seq_len), "--training.steps", str(args.steps),
        "--training.local_batch_size", "1", "--training.warmup_steps", "5",
        "--metrics.log_freq", "1", "--checkpoint.enable", "false", "--job.dump_folder", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    """Run the three trainings and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--docs", type=int, default=3000)
    args = p.parse_args(argv)
    print(f"# python scripts/bench_documents.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        size = write_corpus(corpus, args.docs, seed=0)
        print(
            f"# corpus: {args.docs} documents, {size / 1e6:.1f} MB, log-normal lengths; flavor {args.flavor}, "
            f"cp {args.cp}, seq_len {args.seq_len}, 1 sequence per step, {args.steps} steps"
        )
        print(
            "| mask | layout | tok/s (median) | vs causal | cp work max/mean min / median / max | MiB sent / step |"
        )
        print("|---|---|---|---|---|---|")
        base = None
        for mask, layout in (
            ("causal", "zigzag"),
            ("document_causal", "zigzag"),
            ("document_causal", "balanced"),
        ):
            rows = run(args, corpus, Path(tmp) / f"{mask}_{layout}", mask, layout)
            steady = rows[5:] if len(rows) > 10 else rows
            tps = statistics.median(r["tokens_per_s"] for r in steady)
            base = base or tps
            imb = [r["cp_work_imbalance"] for r in rows if r.get("cp_work_imbalance") is not None]
            sent = statistics.median(r["cp_bytes_sent"] for r in steady) / 2**20
            print(
                f"| {mask} | {layout} | {tps:,.0f} | {tps / base:.2f}x | {min(imb):.3f} / "
                f"{statistics.median(imb):.3f} / {max(imb):.3f} | {sent:.1f} |"
            )


if __name__ == "__main__":
    main()
