"""Data at corpus scale: the token cache, corpus chunks, HF datasets files, the table-free shuffle, dp rows,
and exact resume of the trainer on "text" and "hf" corpora."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cp_dtensor.config import JobConfig
from cp_dtensor.data import (
    ByteTokenizer,
    GlobalBatchLoader,
    HFTokenizer,
    PackedTokenDataset,
    SyntheticRecallDataset,
    TextDataset,
    build_token_cache,
)
from cp_dtensor.data.shuffle import permute_indices

try:
    import datasets
except ImportError:  # the optional extra: pip install "cp_dtensor[hf]"
    datasets = None
try:
    import tokenizers
except ImportError:
    tokenizers = None

needs_datasets = pytest.mark.skipif(datasets is None, reason='needs pip install "cp_dtensor[hf]" (datasets)')
needs_tokenizers = pytest.mark.skipif(tokenizers is None, reason='needs pip install "cp_dtensor[hf]"')

TEXTS = ["a" * 3, "b" * 20, "c", "d" * 7, "", "e" * 45, "f" * 2, "g é" * 6, "h" * 30, "i" * 5, "j" * 9]


def _corpus(tmp_path: Path) -> list[Path]:
    """A JSONL file of documents of very different lengths (one empty) and a multi-line .txt document."""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(TEXTS)) + "\n")
    txt = tmp_path / "book.txt"
    txt.write_text("line one\nline two is longer\n\nthird line\n" * 4, encoding="utf-8")
    return [jsonl, txt]


def _assert_same_samples(got, want) -> None:
    assert len(got) == len(want) and got.num_tokens == want.num_tokens
    assert got.num_documents == want.num_documents
    for i in range(len(want)):
        a, b = got[i], want[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)


@pytest.mark.parametrize("chunk_bytes", [7, 50, 1 << 20])
def test_token_cache_gives_the_in_memory_samples_for_any_chunking(tmp_path: Path, chunk_bytes: int) -> None:
    """Chunks cut mid-line, mid-.txt-document and with no line start at all give the same packed stream."""
    paths = _corpus(tmp_path)
    for reset in (False, True):
        want = TextDataset(paths, seq_len=16, reset_positions=reset)
        cache = build_token_cache(
            paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c", chunk_bytes=chunk_bytes
        )
        _assert_same_samples(PackedTokenDataset(cache, 16, reset_positions=reset), want)
    assert cache.read(0, 5).dtype == np.int64 and cache.vocab_size == 258


def test_builders_share_the_chunks_and_write_what_one_builder_writes(tmp_path: Path) -> None:
    paths = _corpus(tmp_path)
    one = build_token_cache(paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "one", chunk_bytes=40)
    meet = threading.Barrier(3)
    built = [None] * 3

    def builder(rank: int) -> None:
        built[rank] = build_token_cache(
            paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "three", chunk_bytes=40,
            rank=rank, world_size=3, barrier=meet.wait,
        )  # fmt: skip

    threads = [threading.Thread(target=builder, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(p.name for p in one.path.iterdir())
    assert files == sorted(p.name for p in built[0].path.iterdir()) and len(files) > 3
    for name in files:
        assert (one.path / name).read_bytes() == (built[0].path / name).read_bytes(), name
    assert one.read(0, one.num_tokens).tolist() == built[2].read(0, one.num_tokens).tolist()
    with pytest.raises(ValueError, match="need a barrier"):
        build_token_cache(paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "x", world_size=2)


def test_cache_is_reused_rebuilt_when_a_file_changes_and_reports_progress(tmp_path: Path) -> None:
    paths = _corpus(tmp_path)
    lines: list[str] = []
    first = build_token_cache(paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c", log=lines.append)
    assert len(lines) == 1 and re.search(
        r"tokenizing text corpus into .*: \d+\.\d/\d+\.\d MiB \(100%\), [\d.]+M tokens/s, ETA \d+s - done$",
        lines[0],
    ), lines  # bytes, tokens/s, ETA
    lines.clear()
    again = build_token_cache(paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c", log=lines.append)
    assert again.path == first.path and lines == []  # reused: nothing tokenized
    paths[0].write_text(json.dumps({"text": "changed"}) + "\n")
    changed = build_token_cache(paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c", log=lines.append)
    assert changed.path != first.path and lines and changed.num_documents == 2


@needs_tokenizers
def test_token_cache_with_a_hf_tokenizer_equals_the_in_memory_dataset(tmp_path: Path) -> None:
    from test_data import _train_bpe

    tok = HFTokenizer(_train_bpe(tmp_path / "tokenizer.json"))
    jsonl = _corpus(tmp_path)[0]
    cache = build_token_cache(jsonl, tokenizer=tok, cache_dir=tmp_path / "c", chunk_bytes=60)
    _assert_same_samples(PackedTokenDataset(cache, 8), TextDataset(jsonl, seq_len=8, tokenizer=tok))
    assert (next(cache.path.glob("*.tokens")).stat().st_size) % 2 == 0  # ~300 ids: uint16 on disk


@needs_datasets
def test_hf_files_parquet_json_and_a_saved_dataset_pack_like_text(tmp_path: Path) -> None:
    jsonl = _corpus(tmp_path)[0]
    want = TextDataset(jsonl, seq_len=8)
    table = datasets.Dataset.from_dict({"content": TEXTS, "n": list(range(len(TEXTS)))})
    table.to_parquet(str(tmp_path / "docs.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for paths, field in (
        (tmp_path / "docs.parquet", "content"),
        (tmp_path / "saved", "content"),
        (jsonl, "text"),
    ):
        cache = build_token_cache(
            paths, kind="hf", text_field=field, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c"
        )
        _assert_same_samples(PackedTokenDataset(cache, 8), want)
    with pytest.raises(
        ValueError, match=r"docs.parquet: the dataset has no field 'text' \(found \['content', 'n'\]\)"
    ):
        build_token_cache(
            tmp_path / "docs.parquet", kind="hf", tokenizer=ByteTokenizer(), cache_dir=tmp_path / "d"
        )


def test_bad_records_name_the_file_and_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl \(line at byte 15\): line is not valid JSON"):
        build_token_cache(bad, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c")
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"no field 'text' \(found \['body'\]\); set data.jsonl_field"):
        build_token_cache(bad, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_seeded_bijection_per_epoch(n: int) -> None:
    p = permute_indices(np.arange(n), n, seed=3, epoch=0)
    assert sorted(p.tolist()) == list(range(n))
    assert p.tolist() == permute_indices(np.arange(n), n, seed=3, epoch=0).tolist()  # deterministic
    if n >= 7:
        assert p.tolist() != list(range(n))
        assert p.tolist() != permute_indices(np.arange(n), n, seed=3, epoch=1).tolist()
        assert p.tolist() != permute_indices(np.arange(n), n, seed=4, epoch=0).tolist()
    assert permute_indices(np.arange(n)[::-1], n, seed=3, epoch=0).tolist() == p[::-1].tolist()  # per index


class _Recorded(SyntheticRecallDataset):
    """The recall task, remembering which samples were read."""

    def __init__(self) -> None:
        super().__init__(64, 300, seed=1, num_samples=50)
        self.read: list[int] = []

    def __getitem__(self, index: int):
        self.read.append(index)
        return super().__getitem__(index)


def test_each_dp_rank_reads_only_its_rows_of_the_global_batch() -> None:
    whole = GlobalBatchLoader(_Recorded(), global_batch_size=6, seed=2)
    for k in (0, 8, 9):  # 9: straddles the first epoch boundary (50 samples)
        batch = whole.get_batch(k)
        parts = []
        for rank in range(3):
            data = _Recorded()
            loader = GlobalBatchLoader(data, global_batch_size=6, seed=2, dp_rank=rank, dp_degree=3)
            parts.append(loader.get_batch(k))
            assert data.read == whole.sample_indices(k)[2 * rank : 2 * rank + 2]  # its 2 rows, nothing else
        for key in batch:
            assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    with pytest.raises(ValueError, match="does not split global_batch_size 6"):
        GlobalBatchLoader(_Recorded(), global_batch_size=6, dp_rank=0, dp_degree=4)


# ---------------------------------------------------------------------------------------------------------
# The trainer on corpora: exact resume (cp 2)
# ---------------------------------------------------------------------------------------------------------


def _run_text_and_hf_resume(dump: str, paths: dict[str, str]) -> dict[str, tuple[list[float], list[float]]]:
    """On every rank: per dataset, 5 uninterrupted steps (checkpoints at 2, 4, 5), then a run resumed from
    step 2 (the later checkpoints removed) to step 5; returns (uninterrupted, resumed) losses."""
    import torch.distributed as dist

    from cp_dtensor.trainer import Trainer

    out = {}
    for kind, path in paths.items():
        folder = Path(dump) / kind
        cfg = {
            "job": {"dump_folder": str(folder)},
            "model": {"flavor": "debug", "attention_mask": "document_causal"},
            "training": {"seq_len": 64, "local_batch_size": 2, "steps": 5, "warmup_steps": 1, "lr": 3e-3},
            "parallelism": {"context_parallel_degree": 2},
            "data": {
                "dataset": kind,
                "paths": [path],
                "jsonl_field": "body",
                "cache_dir": str(Path(dump) / "tc"),
            },
            "checkpoint": {"enable": True, "interval": 2},
            "metrics": {"log_freq": 1},
        }
        full = [r.loss for r in Trainer(JobConfig.from_dict(cfg)).train()]
        dist.barrier()
        if dist.get_rank() == 0:
            for step in ("step-4", "step-5"):
                shutil.rmtree(folder / "checkpoint" / step)
        dist.barrier()
        resumed = [r.loss for r in Trainer(JobConfig.from_dict(cfg)).train()]
        out[kind] = (full, resumed)
    return out


@needs_datasets
def test_text_and_hf_runs_stopped_at_step_2_resume_to_the_uninterrupted_losses(
    tmp_path: Path, dist_pool
) -> None:
    rows = [{"body": f"document {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5)} for i in range(60)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "corpus.parquet"))
    paths = {"text": str(jsonl), "hf": str(tmp_path / "corpus.parquet")}
    result = dist_pool(2).run(_run_text_and_hf_resume, str(tmp_path), paths)[0]
    for kind, (full, resumed) in result.items():
        assert len(full) == 5 and len(resumed) == 3, (kind, full, resumed)
        assert resumed == full[2:], (kind, full, resumed)  # bit-identical: same batches, same state
    assert result["text"][0] == result["hf"][0]  # the same documents packed the same way


def test_pretokenize_script_writes_the_cache_the_trainer_opens(tmp_path: Path) -> None:
    """scripts/pretokenize.py with 2 workers writes the cache that _build_data then finds (nothing rebuilt)."""
    import subprocess
    import sys

    from cp_dtensor.config import load_config
    from cp_dtensor.trainer.builders import DataPlacement, _build_data

    root = Path(__file__).resolve().parent.parent
    args = ["--data.dataset", "text", "--data.paths", ",".join(map(str, _corpus(tmp_path)))]
    args += ["--job.dump_folder", str(tmp_path / "out"), "--training.seq_len", "16"]
    proc = subprocess.run(
        [sys.executable, "scripts/pretokenize.py", *args, "--workers", "2", "--progress-every", "0"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"MiB \(100%\), [\d.]+M tokens/s, ETA \d+s - done", proc.stdout), proc.stdout
    assert re.search(r"token cache .*: \d+ tokens, 11 documents, [\d.]+s with 2 worker\(s\)", proc.stdout), (
        proc.stdout
    )
    lines: list[str] = []
    data = _build_data(load_config(args), 258, 2, DataPlacement(log=lines.append))
    assert lines == [] and "11 documents" in data.summary  # opened, not rebuilt
    _assert_same_samples(data.loader.dataset, TextDataset(_corpus(tmp_path), seq_len=16))


def test_ranks_that_disagree_on_whether_the_cache_exists_still_meet(tmp_path: Path) -> None:
    """Another job may finish the same cache between two ranks' checks: one rank finds it complete, the other
    builds. Both must take part in the same barriers (before, the first returned at once and the builder
    waited for it until the timeout)."""
    paths = _corpus(tmp_path)
    first = build_token_cache(paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c", chunk_bytes=40)
    meet = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def builder(rank: int) -> None:
        try:
            build_token_cache(
                paths, tokenizer=ByteTokenizer(), cache_dir=tmp_path / "c", chunk_bytes=40,
                rank=rank, world_size=2, barrier=meet.wait,
            )  # fmt: skip
        except BaseException as e:
            errors.append(e)

    sees_complete = threading.Thread(target=builder, args=(1,))
    sees_complete.start()
    deadline = time.monotonic() + 10
    while meet.n_waiting == 0 and sees_complete.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # rank 1 found the index: it should now wait at the first barrier
    (first.path / "index.json").unlink()  # rank 0 looks later and finds no index
    builder(0)
    sees_complete.join()
    assert errors == [] and (first.path / "index.json").is_file()
