"""Corpus sources: which files a dataset reads, cut into chunks that can be tokenized independently.

Note [Corpus chunks]
~~~~~~~~~~~~~~~~~~~~
A corpus is split into chunks without reading it: only file sizes are needed, so planning is O(files).
Text files (``.txt``, ``.jsonl``) are cut every ``chunk_bytes`` bytes, and a line belongs to the chunk
in which its first byte lies; HF data files (parquet, JSON, arrow) are one chunk each::

    file  |line 1 .......|line 2 ..|line 3 .........................|line 4 ...|
          0          C              2C             3C                          size
    chunk 0: lines 1, 2 (start in [0, C))   chunk 1: line 3   chunk 2: (none)   chunk 3: line 4

A chunk finds its own first line by scanning from its nominal start to the next newline, so any process can
tokenize any chunk, and the chunks in order give back the files in order: the token stream does not depend
on how many processes built it. A ``.jsonl`` line is one document; a ``.txt`` file is one document, whose
BOS goes with its first chunk and EOS with its last (with a HuggingFace tokenizer a merge across a chunk
boundary of a long ``.txt`` file is cut, which no byte-tokenized corpus notices).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from cp_dtensor.data.common import parse_jsonl_line

__all__ = [
    "CHUNK_BYTES",
    "HF_SUFFIXES",
    "TEXT_SUFFIXES",
    "Chunk",
    "DocumentBatch",
    "expand_sources",
    "plan_chunks",
    "read_chunk",
]

SourceKind = Literal["text", "hf"]

CHUNK_BYTES = 16 * 2**20
"""Bytes of text per chunk: the unit of parallel pre-tokenization and the bound of a builder's memory."""

TEXT_SUFFIXES = (".txt", ".jsonl")
HF_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
"""HF data file suffixes and the `datasets` builder that reads each."""

_DOCS_PER_BATCH = 1024  # documents per encode call (bounds the tokenizer's temporary objects)
HF_EXTRA_HINT = 'pip install "cp_dtensor[hf]"'


def expand_sources(paths: str | Path | Sequence[str | Path], kind: SourceKind = "text") -> list[Path]:
    """The files a corpus reads, in order.

    Args:
        paths: Files and folders. For "text": ``.txt`` / ``.jsonl`` files; a folder stands for its files of
            those suffixes (sorted). For "hf": parquet / JSON / JSONL / arrow files; a folder saved by
            ``datasets.Dataset.save_to_disk`` stands for its arrow files (in its own order), any other folder
            for its data files, searched recursively (sorted).
        kind: "text" or "hf".

    Returns:
        The files.

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: No paths, an unsupported suffix, or a folder without data files.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ValueError(f"a {kind!r} corpus needs at least one file or folder; got an empty list")
    suffixes = TEXT_SUFFIXES if kind == "text" else tuple(HF_SUFFIXES)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"dataset file not found: {path}")
        if path.is_dir():
            found = _folder_files(path, kind, suffixes)
            if not found:
                raise ValueError(f"dataset directory {path} holds no {'/'.join(suffixes)} files")
            files.extend(found)
        elif path.suffix in suffixes:
            files.append(path)
        else:
            what = (
                "a .txt (one document) or .jsonl (one document per line) file"
                if kind == "text"
                else "a parquet, JSON, JSONL or arrow file, or a dataset folder"
            )
            raise ValueError(f"unsupported dataset file {path}: expected {what}")
    return files


def _folder_files(folder: Path, kind: SourceKind, suffixes: Sequence[str]) -> list[Path]:
    if kind == "text":
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
    state = folder / "state.json"  # written by datasets' save_to_disk, with the arrow files in order
    if state.is_file():
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        return [folder / name for name in names]
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)


@dataclass(frozen=True)
class Chunk:
    """One independently tokenized piece of a corpus (Note [Corpus chunks]).

    Attributes:
        path: The file.
        kind: "text" or "hf".
        start: Nominal first byte (text files; lines starting in ``[start, stop)`` belong to the chunk).
        stop: Nominal end byte.
        size: The file's size.
    """

    path: Path
    kind: SourceKind
    start: int
    stop: int
    size: int


@dataclass
class DocumentBatch:
    """Texts read from a chunk, with how each is wrapped.

    Attributes:
        texts: The texts, in order.
        bos: Prepend BOS to each (a document starts with each text).
        eos: Append EOS to each (a document ends with each text).
        bytes_read: Bytes of the file this batch consumed (for progress).
    """

    texts: list[str]
    bos: bool
    eos: bool
    bytes_read: int


def plan_chunks(files: Sequence[Path], kind: SourceKind, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut files into chunks from their sizes alone (Note [Corpus chunks]).

    Args:
        files: From :func:`expand_sources`.
        kind: "text" or "hf".
        chunk_bytes: Nominal bytes per chunk of a text file.

    Returns:
        The chunks, in stream order.
    """
    chunks = []
    for path in files:
        size = path.stat().st_size
        if kind == "hf":
            chunks.append(Chunk(path, kind, 0, size, size))
            continue
        for start in range(0, max(size, 1), chunk_bytes):
            chunks.append(Chunk(path, kind, start, min(start + chunk_bytes, size), size))
    return chunks


def read_chunk(chunk: Chunk, text_field: str) -> Iterator[DocumentBatch]:
    """The documents of one chunk, in batches.

    Args:
        chunk: The chunk.
        text_field: JSONL / HF field holding the text.

    Yields:
        Batches of texts with their BOS/EOS wrapping.

    Raises:
        ValueError: Invalid UTF-8 or JSON, a record without ``text_field`` or with a non-string text (the
            file and byte offset or row named), a missing ``datasets`` library for "hf".
    """
    if chunk.kind == "hf":
        yield from _read_hf_file(chunk, text_field)
        return
    with chunk.path.open("rb") as f:
        begin = _line_start(f, chunk.start, chunk.size)
        end = _line_start(f, chunk.stop, chunk.size)
        if begin >= end:
            return
        f.seek(begin)
        data = f.read(end - begin)
    if chunk.path.suffix == ".txt":
        yield DocumentBatch(
            [_decode(data, chunk.path, begin)], bos=begin == 0, eos=end == chunk.size, bytes_read=len(data)
        )
        return
    texts: list[str] = []
    offset = reported = begin
    for line in data.split(b"\n"):
        text = _jsonl_text(line, chunk.path, offset, text_field)
        offset += len(line) + 1
        if text:
            texts.append(text)
        if len(texts) == _DOCS_PER_BATCH:
            yield DocumentBatch(texts, bos=True, eos=True, bytes_read=offset - reported)
            texts, reported = [], offset
    yield DocumentBatch(texts, bos=True, eos=True, bytes_read=min(offset, end) - reported)


def _line_start(f: BinaryIO, position: int, size: int) -> int:
    """The first line start at or after ``position`` (0 at 0; ``size`` when no line starts there)."""
    if position <= 0:
        return 0
    if position >= size:
        return size
    f.seek(position - 1)
    scanned = position - 1
    while True:
        block = f.read(1 << 16)
        if not block:
            return size
        newline = block.find(b"\n")
        if newline >= 0:
            return scanned + newline + 1
        scanned += len(block)


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"dataset file {path} is not valid UTF-8 (byte {offset + err.start}: {err.reason})"
        ) from None


def _jsonl_text(line: bytes, path: Path, offset: int, text_field: str) -> str:
    """The text of one JSONL line ("" for a blank line)."""
    if not line.strip():
        return ""
    where = f"{path} (line at byte {offset})"
    record = parse_jsonl_line(line, where)
    if not isinstance(record, dict) or text_field not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: JSON record has no field {text_field!r} (found {found}); set data.jsonl_field to the "
            f"name of the text field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def _read_hf_file(chunk: Chunk, text_field: str) -> Iterator[DocumentBatch]:
    """Rows of one HF data file, streamed by `datasets` (nothing is loaded whole or cached)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f'data.dataset "hf" reads files with the HuggingFace datasets library: {HF_EXTRA_HINT}'
        ) from None
    builder = HF_SUFFIXES[chunk.path.suffix]
    stream = datasets.load_dataset(builder, data_files=[str(chunk.path)], split="train", streaming=True)
    rows = 0
    for batch in stream.iter(batch_size=_DOCS_PER_BATCH):
        if text_field not in batch:
            raise ValueError(
                f"{chunk.path}: the dataset has no field {text_field!r} (found {sorted(batch)}); set "
                f"data.jsonl_field to the name of the text field"
            )
        texts = batch[text_field]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(
                    f"{chunk.path} row {rows + i}: field {text_field!r} must be a string, got "
                    f"{type(text).__name__}"
                )
        rows += len(texts)
        yield DocumentBatch([t for t in texts if t], bos=True, eos=True, bytes_read=0)
    yield DocumentBatch([], bos=True, eos=True, bytes_read=chunk.size)
