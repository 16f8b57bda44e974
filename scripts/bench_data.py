#!/usr/bin/env python3
"""Data at corpus scale: per-rank memory and time to step 1 against corpus size, and tokenization speed.

    python scripts/bench_data.py                                    # 10 MB / 100 MB / 1 GB, cp 2 and dp 2 x cp 2
    python scripts/bench_data.py --sizes-mb 10 100 --plans cp2 --json data.json

Generates JSONL corpora of random-word documents (deterministic; kept in --dir and reused), then per corpus:

1. builds its token cache once with the trainer's own code (one process; the one-time cost, linear in the
   corpus) and reports MiB/s and tokens/s;
2. per plan (cp2: 2 ranks; dp2cp2: 4 ranks) starts the real trainer (train.py's launcher, debug model,
   data.dataset "text", seq_len --seq-len) and runs one step: reports the max RSS of every rank and the
   time from launching the ranks to the end of step 1 (the latest rank), with the cache present;
3. the same for the cold start of the smallest plan (no cache: the ranks tokenize their shares first).

It also measures tokenization throughput of the byte tokenizer and of a HuggingFace tokenizer.json (a BPE
trained here on the corpus with the tokenizers library, nothing downloaded). The numbers go to stdout as a
markdown table and, with --json, to a file. See docs/data.md for measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from cp_dtensor.config import JobConfig
from cp_dtensor.data import ByteTokenizer, HFTokenizer, build_token_cache
from cp_dtensor.launch import run_distributed

PLANS = {
    "cp2": {"context_parallel_degree": 2},
    "dp2cp2": {"context_parallel_degree": 2, "data_parallel_degree": 2},
}
WORDS = [f"w{i}" for i in range(4000)] + ["the", "of", "and", "a", "to", "in", "is", "context", "parallel"]


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    """A JSONL corpus of about ``size_mb`` MiB: documents of 20-4000 random words (reused if present)."""
    if path.exists() and path.stat().st_size >= size_mb * 2**20 * 0.99:
        return
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    tmp = path.with_suffix(".tmp")
    written, doc = 0, 0
    with tmp.open("w") as f:
        while written < size_mb * 2**20:
            lines = []
            for n in rng.integers(20, 4000, size=256):
                lines.append(
                    json.dumps({"text": f"doc {doc}: " + " ".join(words[rng.integers(0, len(words), n)])})
                )
                doc += 1
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)
    tmp.rename(path)


def _rank_job(cfg_dict: dict, out_dir: str, t_launch: float) -> None:
    """On every rank: build the trainer, run one step, write (time to step 1, max RSS) to out_dir."""
    import torch.distributed as dist

    from cp_dtensor.trainer import Trainer
    from cp_dtensor.trainer.builders import DataPlacement, _build_data

    cfg = JobConfig.from_dict(cfg_dict)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = cfg.parallelism.data_parallel_degree if cfg.parallelism.data_parallel_degree > 0 else 1
    t0 = time.perf_counter()  # the data part alone: open the cache, read this rank's rows of batch 0
    data = _build_data(
        cfg, 258, dp, DataPlacement(rank // (world // dp), dp, rank, world, barrier=dist.barrier)
    )
    next(data.loader)
    data_s = time.perf_counter() - t0
    trainer = Trainer(cfg)
    trainer.train_one_step()
    done = time.time()
    record = {
        "rank": rank,
        "time_to_step1_s": done - t_launch,
        "data_startup_ms": 1e3 * data_s,
        "max_rss_mib": _max_rss_mib(),
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    trainer.metrics.close()


def _max_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: that survives exec, so a spawned rank
    would report at least its launcher's peak (Linux keeps rusage across execve)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plan(corpus: Path, plan: str, cache_dir: Path, seq_len: int) -> list[dict]:
    """Launch the trainer's ranks for one step; per-rank records."""
    par = PLANS[plan]
    world = par.get("data_parallel_degree", 1) * par["context_parallel_degree"]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as dump:
        cfg = {
            "job": {"dump_folder": dump},
            "model": {"flavor": "debug"},
            "training": {"seq_len": seq_len, "local_batch_size": 1, "steps": 1},
            "parallelism": par,
            "data": {"dataset": "text", "paths": [str(corpus)], "cache_dir": str(cache_dir)},
            "metrics": {"log_freq": 1},
        }
        t_launch = time.time()
        run_distributed(_rank_job, world, cfg, dump, t_launch, timeout_s=1800)
        return [json.loads((Path(dump) / f"rank{r}.json").read_text()) for r in range(world)]


def tokenize_throughput(corpus: Path, tokenizer, cache_dir: Path) -> dict:
    """One-process build of a fresh cache: MiB/s and tokens/s."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    cache = build_token_cache(corpus, tokenizer=tokenizer, cache_dir=cache_dir)
    seconds = time.perf_counter() - t0
    mib = corpus.stat().st_size / 2**20
    return {
        "tokenizer": tokenizer.name,
        "corpus_mib": round(mib, 1),
        "seconds": round(seconds, 2),
        "mib_per_s": round(mib / seconds, 1),
        "tokens": cache.num_tokens,
        "tokens_per_s": round(cache.num_tokens / seconds),
    }


def train_bpe(corpus: Path, path: Path, vocab_size: int = 8192) -> Path:
    """A byte-level BPE tokenizer.json trained on the first MiB of the corpus (Llama 3's special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with corpus.open() as f:
        sample = [json.loads(line)["text"] for line in f.read(2**20).splitlines()[:-1]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample, trainer)
    tok.save(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cpd_corpora")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--hf-mb", type=int, default=10, help="corpus size for the HF tokenizer's throughput")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--warm-only", action="store_true", help="reuse existing caches, skip the cold runs")
    parser.add_argument("--repeat", type=int, default=1, help="runs per plan; the fastest is reported")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"host": {"cpus": os.cpu_count()}, "throughput": [], "runs": []}

    for size in sorted(set(args.sizes_mb) | {args.hf_mb}):
        make_corpus(args.dir / f"corpus_{size}mb.jsonl", size)

    small = args.dir / f"corpus_{args.hf_mb}mb.jsonl"
    if args.warm_only:
        small = None
    if small is not None:
        report["throughput"].append(tokenize_throughput(small, ByteTokenizer(), args.dir / "tp_byte"))
        try:
            hf = HFTokenizer(train_bpe(small, args.dir / "bpe_tokenizer.json"))
            report["throughput"].append(tokenize_throughput(small, hf, args.dir / "tp_hf"))
        except ValueError as e:  # no tokenizers library
            print(f"skipping the HF tokenizer: {e}")
    for row in report["throughput"]:
        print(f"tokenize {row}", flush=True)

    for size in args.sizes_mb:
        corpus = args.dir / f"corpus_{size}mb.jsonl"
        cache_dir = args.dir / f"cache_{size}mb"
        rows = []
        if not args.warm_only:
            shutil.rmtree(cache_dir, ignore_errors=True)
            cold = run_plan(corpus, args.plans[0], cache_dir, args.seq_len)  # the ranks build the cache
            rows.append(_summary(size, args.plans[0] + " (cold: builds the cache)", cold))
        for plan in args.plans:
            runs = [
                _summary(size, plan, run_plan(corpus, plan, cache_dir, args.seq_len))
                for _ in range(args.repeat)
            ]
            rows.append(min(runs, key=lambda row: row["time_to_step1_s"]))
        for row in rows:
            print(f"run {row}", flush=True)
        report["runs"] += rows

    print(
        "\n| corpus | plan | time to step 1 (s) | data start-up (ms) | max RSS per rank (MiB) |\n|---|---|---|---|---|"
    )
    for row in report["runs"]:
        rss = " / ".join(f"{x:.0f}" for x in row["max_rss_mib"])
        print(
            f"| {row['corpus_mb']} MB | {row['plan']} | {row['time_to_step1_s']:.1f} | "
            f"{row['data_startup_ms']:.1f} | {rss} |"
        )
    print("\n| tokenizer | corpus | MiB/s | tokens/s |\n|---|---|---|---|")
    for row in report["throughput"]:
        print(
            f"| {row['tokenizer']} | {row['corpus_mib']} MiB | {row['mib_per_s']} | {row['tokens_per_s']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def _summary(size: int, plan: str, records: list[dict]) -> dict:
    records = sorted(records, key=lambda r: r["rank"])
    return {
        "corpus_mb": size,
        "plan": plan,
        "time_to_step1_s": round(max(r["time_to_step1_s"] for r in records), 2),
        "max_rss_mib": [round(r["max_rss_mib"]) for r in records],
        "data_startup_ms": round(max(r["data_startup_ms"] for r in records), 1),
    }


if __name__ == "__main__":
    main()
