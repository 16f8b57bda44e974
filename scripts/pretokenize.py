#!/usr/bin/env python3
"""Tokenize a job's corpus into its token cache ahead of training (Note [Token cache]).

    python scripts/pretokenize.py --config train_configs/llama3_8b_128k.toml [--workers 8] [--section.key VALUE ...]

Takes the data settings (``data.dataset``, ``data.paths``, ``data.tokenizer``, ``data.jsonl_field``,
``data.cache_dir``, ``job.dump_folder``) from the same config and command-line overrides as train.py, so the
cache it writes is the one training opens; ``--workers N`` tokenizes the chunks in N processes (the cache
does not depend on N). Training builds a missing cache itself with all its ranks; this script is for
corpora large enough that the one-time build should not hold the job's devices. Prints a progress line
(MiB done, tokens/s, ETA) every few seconds and the cache path at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cp_dtensor.config import ConfigError, JobConfig, load_config
from cp_dtensor.data import build_token_cache, load_tokenizer
from cp_dtensor.trainer.builders import token_cache_dir


def _build(cfg: JobConfig, rank: int, workers: int, barrier: Any, every_s: float) -> tuple[str, int, int]:
    cache = build_token_cache(
        cfg.data.paths,
        tokenizer=load_tokenizer(cfg.data.tokenizer),
        cache_dir=token_cache_dir(cfg),
        kind=cfg.data.dataset,
        text_field=cfg.data.jsonl_field,
        rank=rank,
        world_size=workers,
        barrier=barrier.wait if barrier is not None else None,
        log=(lambda line: print(line, flush=True)) if rank == 0 else None,
        progress_every_s=every_s,
    )
    return str(cache.path), cache.num_tokens, cache.num_documents


def _worker(cfg: JobConfig, rank: int, workers: int, barrier: Any, every_s: float) -> None:
    _build(cfg, rank, workers, barrier, every_s)


def main(argv: list[str]) -> int:
    """Build the cache; returns the exit code (2 for a bad config)."""
    workers, every_s, rest = 1, 5.0, []
    i = 0
    while i < len(argv):
        if argv[i] in ("--workers", "--progress-every"):
            value = argv[i + 1]
            if argv[i] == "--workers":
                workers = int(value)
            else:
                every_s = float(value)
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    try:
        cfg = load_config(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.data.dataset not in ("text", "hf"):
        print(
            f'error: data.dataset is "{cfg.data.dataset}"; pretokenize "text" or "hf" corpora',
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers) if workers > 1 else None
    others = [
        ctx.Process(target=_worker, args=(cfg, r, workers, barrier, every_s)) for r in range(1, workers)
    ]
    for p in others:
        p.start()
    path, tokens, documents = _build(cfg, 0, workers, barrier, every_s)
    for p in others:
        p.join()
        if p.exitcode:
            print(f"error: worker {p.pid} failed with exit code {p.exitcode}", file=sys.stderr)
            return 1
    seconds = time.perf_counter() - t0
    print(
        f"token cache {path}: {tokens} tokens, {documents} documents, {seconds:.1f}s with {workers} worker(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
