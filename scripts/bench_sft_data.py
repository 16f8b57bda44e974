#!/usr/bin/env python3
"""The "sft" dataset at scale: memory and time to index a prompt/completion JSONL file against its size.

    python scripts/bench_sft_data.py                          # 10 MB and 100 MB, byte tokenizer, seq_len 8192
    python scripts/bench_sft_data.py --sizes-mb 10 --tokenizer path/to/tokenizer.json

Generates JSONL files of random-word records (prompt 20-120 words, completion 10-80; deterministic, kept in
--dir and reused), then for each size builds ``SFTDataset(path, --seq-len)`` in a fresh process, as every
rank of a trainer does, and reports the seconds to build it and the process's max RSS above the same
process reading a 50-record file (the interpreter, torch and the tokenizer). See docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "context",
    "parallel",
    "ring",
    "attention",
    "sequence",
    "shard",
    "token",
]

_MEASURE = """
import json, resource, sys, time
from cp_dtensor.data.sft import SFTDataset
from cp_dtensor.data.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[3]) if sys.argv[3] else None
t0 = time.perf_counter()
data = SFTDataset(sys.argv[1], int(sys.argv[2]), tokenizer=tokenizer)
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"records": data.num_documents, "samples": len(data), "seconds": seconds, "max_rss_mib": rss}))
"""


def make_sft_file(path: Path, size_mb: float, seed: int = 0) -> None:
    """A prompt/completion JSONL file of about ``size_mb`` MiB (reused if present)."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    tmp = path.with_suffix(".tmp")
    written = 0
    with tmp.open("w") as f:
        while written < size_mb * 2**20:
            prompt = " ".join(rng.choice(words, size=int(rng.integers(20, 121))))
            completion = " ".join(rng.choice(words, size=int(rng.integers(10, 81))))
            line = json.dumps({"prompt": prompt, "completion": completion}) + "\n"
            f.write(line)
            written += len(line)
    tmp.rename(path)


def measure(path: Path, seq_len: int, tokenizer: str) -> dict:
    """Build the dataset of ``path`` in a fresh process; its records, samples, seconds and max RSS."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(seq_len), tokenizer],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Generate the files, measure each, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--tokenizer", default="", help="a tokenizer.json (default: the byte tokenizer)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cpd_sft_data")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    small = args.dir / "sft_50_records.jsonl"
    if not small.exists():
        make_sft_file(args.dir / "sft_0.1mb.jsonl", 0.1)
        lines = (args.dir / "sft_0.1mb.jsonl").read_text().splitlines()[:50]
        small.write_text("\n".join(lines) + "\n")
    base = measure(small, args.seq_len, args.tokenizer)["max_rss_mib"]
    print(f"baseline (50 records): max RSS {base:.0f} MiB")
    print("| file MiB | records | samples | build s | max RSS above baseline MiB | MiB per MiB of text |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes_mb:
        path = args.dir / f"sft_{size:g}mb.jsonl"
        make_sft_file(path, size)
        r = measure(path, args.seq_len, args.tokenizer)
        mib = path.stat().st_size / 2**20
        above = r["max_rss_mib"] - base
        print(
            f"| {mib:.0f} | {r['records']:,} | {r['samples']:,} | {r['seconds']:.1f} | {above:,.0f} | "
            f"{above / mib:.2f} |"
        )


if __name__ == "__main__":
    main()
