"""The token cache: a corpus tokenized once into memory-mapped shards, then read window by window.

Note [Token cache]
~~~~~~~~~~~~~~~~~~
A corpus of any size is tokenized once, in chunks (Note [Corpus chunks]) shared out over every rank of
the job (or the workers of ``scripts/pretokenize.py``), into a folder keyed by what decides its content::

    <cache_dir>/<kind>-<key>/          key = hash(files: path, size, mtime; tokenizer; text field; chunk size)
        chunk-000000.tokens            token ids, uint16 when the vocabulary fits (byte: 258 ids), else uint32
        chunk-000000.docs              int64 offsets of the chunk's document starts (a .txt piece may have none)
        ...
        index.json                     tokens and documents per chunk; written last: the cache is complete

    rank r builds chunks r, r + W, r + 2W, ...  ->  barrier  ->  rank 0 writes index.json  ->  barrier
    (every rank passes both barriers, also one that found the cache complete: no rank can wait alone)

A chunk is written under a temporary name and renamed, so an interrupted build resumes where it stopped;
a finished cache is reused by every later run with the same key (changed files or another tokenizer make
a new key). Reading sample i touches ``seq_len + 1`` tokens of one or two chunk files (``pread``-style,
no mapping kept open) and the document starts between them (a binary search in a mapping opened for the
call), so a rank's memory and its start-up time do not depend on the corpus size once the cache exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cp_dtensor.data.sources import (
    CHUNK_BYTES,
    Chunk,
    SourceKind,
    expand_sources,
    plan_chunks,
    read_chunk,
)
from cp_dtensor.data.tokenizer import Tokenizer, encode_flat, tokenizer_fingerprint

__all__ = ["TokenCache", "build_token_cache", "token_cache_path"]

_FORMAT = 1
_INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def token_cache_path(
    files: Sequence[Path],
    *,
    kind: SourceKind,
    tokenizer: Tokenizer,
    text_field: str,
    cache_dir: str | Path,
    chunk_bytes: int = CHUNK_BYTES,
) -> Path:
    """The cache folder of a corpus (Note [Token cache]); nothing is read but file metadata.

    Args:
        files: The corpus files, in order (from :func:`~cp_dtensor.data.sources.expand_sources`).
        kind: "text" or "hf".
        tokenizer: The tokenizer.
        text_field: The JSONL / HF text field.
        cache_dir: The folder holding caches.
        chunk_bytes: Nominal bytes per text chunk.

    Returns:
        ``cache_dir / f"{kind}-{key}"``.
    """
    parts = [f"format {_FORMAT}", kind, tokenizer_fingerprint(tokenizer), text_field, str(chunk_bytes)]
    for path in files:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{kind}-{key}"


class _Progress:
    """Rate-limited progress lines: bytes done, tokens/s, ETA (a builder's own share of the corpus)."""

    def __init__(
        self, total_bytes: int, what: str, log: Callable[[str], None] | None, every_s: float
    ) -> None:
        self.total, self.what, self.log, self.every_s = total_bytes, what, log, every_s
        self.bytes = self.tokens = 0
        self.t0 = self.last = time.perf_counter()

    def advance(self, nbytes: int, ntokens: int) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        now = time.perf_counter()
        if self.log is not None and now - self.last >= self.every_s:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.t0, 1e-9)
        rate = self.bytes / elapsed
        left = (self.total - self.bytes) / rate if rate > 0 else float("inf")
        eta = f"{max(left, 0.0):.0f}s" if left != float("inf") else "?"
        return (
            f"{self.what}: {self.bytes / 2**20:.1f}/{self.total / 2**20:.1f} MiB "
            f"({100 * self.bytes / max(self.total, 1):.0f}%), {self.tokens / elapsed / 1e6:.2f}M tokens/s, "
            f"ETA {eta}"
        )


def _chunk_files(path: Path, index: int) -> tuple[Path, Path]:
    return path / f"chunk-{index:06d}.tokens", path / f"chunk-{index:06d}.docs"


def _build_chunk(
    chunk: Chunk, index: int, path: Path, tokenizer: Tokenizer, text_field: str, progress: _Progress
) -> None:
    """Tokenize one chunk into its two files (temporary names, renamed when complete)."""
    tokens_file, docs_file = _chunk_files(path, index)
    dtype = token_dtype(tokenizer.vocab_size)
    written, starts = 0, []
    tmp_tokens = tokens_file.with_suffix(f".tokens.tmp{os.getpid()}")
    with tmp_tokens.open("wb") as out:
        for batch in read_chunk(chunk, text_field):
            ids, lengths = encode_flat(tokenizer, batch.texts, bos=batch.bos, eos=batch.eos)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(
                    f"tokenizer {tokenizer.name!r} produced id {int(ids.max())} outside its vocab_size "
                    f"{tokenizer.vocab_size} in {chunk.path}"
                )
            if batch.bos:  # each text starts a document
                starts.append(written + np.cumsum(lengths) - lengths)
            out.write(ids.astype(dtype).tobytes())
            written += ids.size
            progress.advance(batch.bytes_read, ids.size)
    doc_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    tmp_docs = docs_file.with_suffix(f".docs.tmp{os.getpid()}")
    tmp_docs.write_bytes(doc_starts.astype(np.int64).tobytes())
    os.replace(tmp_tokens, tokens_file)
    os.replace(tmp_docs, docs_file)  # the docs file last: its presence marks the chunk complete


def build_token_cache(
    paths: str | Path | Sequence[str | Path],
    *,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    kind: SourceKind = "text",
    text_field: str = "text",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress_every_s: float = 10.0,
) -> TokenCache:
    """Open a corpus's token cache, building the missing part first (Note [Token cache]).

    Every one of ``world_size`` processes calls this with its ``rank``; each tokenizes its share of the
    chunks, then they meet at ``barrier`` and rank 0 writes the index.

    Args:
        paths: Corpus files and folders (see :func:`~cp_dtensor.data.sources.expand_sources`).
        tokenizer: The tokenizer (its BOS/EOS wrap each document).
        cache_dir: Folder holding caches; must be visible to every process.
        kind: "text" (``.txt`` / ``.jsonl``) or "hf" (parquet / JSON / arrow files via `datasets`).
        text_field: JSONL / HF field holding the text.
        rank: This process's index among the builders.
        world_size: Number of builders.
        barrier: Waits for every builder; required when ``world_size > 1``.
        log: Receives progress lines (give it only on one rank).
        chunk_bytes: Nominal bytes per text chunk (part of the cache key).
        progress_every_s: Seconds between progress lines.

    Returns:
        The complete cache.

    Raises:
        ValueError: What reading a file raises (the file named), ``world_size > 1`` without a barrier,
            or a corpus without any token.
        FileNotFoundError: A missing corpus path.
    """
    if world_size > 1 and barrier is None:
        raise ValueError(f"build_token_cache: {world_size} builders need a barrier to meet at")
    files = expand_sources(paths, kind)
    path = token_cache_path(
        files,
        kind=kind,
        tokenizer=tokenizer,
        text_field=text_field,
        cache_dir=cache_dir,
        chunk_bytes=chunk_bytes,
    )
    # Every builder takes part in both barriers, whatever it found: the ranks must not disagree on whether
    # to wait (another job may finish the same cache between their checks).
    if not (path / _INDEX).is_file():
        chunks = plan_chunks(files, kind, chunk_bytes)
        path.mkdir(parents=True, exist_ok=True)
        mine = [i for i in range(rank, len(chunks), world_size) if not _chunk_files(path, i)[1].is_file()]
        share = sum(chunks[i].stop - chunks[i].start for i in mine)
        who = (
            f"rank {rank}'s share, {len(mine)} of {len(chunks)} chunks"
            if world_size > 1
            else f"{len(mine)} chunks"
        )
        progress = _Progress(share, f"tokenizing {kind} corpus into {path} ({who})", log, progress_every_s)
        for i in mine:
            _build_chunk(chunks[i], i, path, tokenizer, text_field, progress)
        if log is not None and mine:
            log(progress.line() + " - done")
    if barrier is not None:
        barrier()
    if rank == 0 and not (path / _INDEX).is_file():
        _write_index(path, plan_chunks(files, kind, chunk_bytes), tokenizer, kind, files)
    if barrier is not None:
        barrier()
    return TokenCache(path)


def _write_index(
    path: Path, chunks: Sequence[Chunk], tokenizer: Tokenizer, kind: SourceKind, files: Sequence[Path]
) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    counts = []
    for i in range(len(chunks)):
        tokens_file, docs_file = _chunk_files(path, i)
        counts.append([tokens_file.stat().st_size // dtype.itemsize, docs_file.stat().st_size // 8])
    index = {
        "format": _FORMAT,
        "kind": kind,
        "files": [str(f) for f in files],
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "bos": tokenizer.BOS,
        "eos": tokenizer.EOS,
        "dtype": dtype.name,
        "chunks": counts,  # [tokens, documents] per chunk
    }
    if sum(t for t, _ in counts) == 0:
        raise ValueError(f"corpus {[str(f) for f in files]} has no text (every document is empty)")
    tmp = path / f"{_INDEX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, path / _INDEX)


class TokenCache:
    """A complete token cache, read by stream range (Note [Token cache]).

    Args:
        path: The cache folder (holding ``index.json``).

    Attributes:
        path: The folder.
        num_tokens: Length of the token stream.
        num_documents: Documents in it.
        vocab_size: The tokenizer's vocabulary size.
        tokenizer_name: The tokenizer that built it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = json.loads((self.path / _INDEX).read_text())
        if index.get("format") != _FORMAT:
            raise ValueError(f"token cache {self.path} has format {index.get('format')}, expected {_FORMAT}")
        counts = np.asarray(index["chunks"], dtype=np.int64).reshape(-1, 2)  # (C, 2)
        self._token_ends = np.cumsum(counts[:, 0])  # (C,) stream offset where each chunk ends
        self._dtype = np.dtype(index["dtype"])
        self.num_tokens = int(self._token_ends[-1]) if len(counts) else 0
        self.num_documents = int(counts[:, 1].sum())
        self.vocab_size = int(index["vocab_size"])
        self.tokenizer_name = str(index["tokenizer"])

    def _chunks(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """(chunk, chunk's first stream offset, local start, local stop) of the chunks ``[start, stop)`` spans."""
        out = []
        chunk = int(np.searchsorted(self._token_ends, start, side="right"))
        while chunk < len(self._token_ends) and start < stop:
            first = int(self._token_ends[chunk - 1]) if chunk else 0
            end = min(stop, int(self._token_ends[chunk]))
            if end > start:
                out.append((chunk, first, start - first, end - first))
            start, chunk = max(start, end), chunk + 1
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as (stop - start,) int64.

        Raises:
            IndexError: A range outside ``[0, num_tokens]``.
        """
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside the stream of {self.num_tokens} tokens")
        parts = []
        for chunk, _, lo, hi in self._chunks(start, stop):
            tokens_file, _ = _chunk_files(self.path, chunk)
            parts.append(
                np.fromfile(tokens_file, dtype=self._dtype, count=hi - lo, offset=lo * self._dtype.itemsize)
            )
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def document_starts_between(self, low: int, high: int) -> np.ndarray:
        """Stream offsets ``s`` with ``low < s < high`` where a document starts, as (K,) int64."""
        found = []
        for chunk, first, lo, hi in self._chunks(low + 1, high):
            _, docs_file = _chunk_files(self.path, chunk)
            if docs_file.stat().st_size == 0:
                continue
            starts = np.memmap(docs_file, dtype=np.int64, mode="r")  # (D,) sorted, opened for this call only
            a, b = np.searchsorted(starts, [lo, hi])
            found.append(np.array(starts[a:b]) + first)
            del starts
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
