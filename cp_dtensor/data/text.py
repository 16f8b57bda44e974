"""The "text" dataset: local ``.txt`` / ``.jsonl`` documents, tokenized and packed into fixed windows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cp_dtensor.data.common import Sample, parse_jsonl_line
from cp_dtensor.data.packing import pack_window
from cp_dtensor.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["TextDataset"]

_TEXT_SUFFIXES = (".txt", ".jsonl")
_ENCODE_CHUNK = 1024  # documents per encode_batch call (bounds the tokenizer's temporary objects)


def _expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by `paths`; a directory stands for its `.txt` and `.jsonl` files (sorted)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ValueError("TextDataset needs at least one path to a .txt or .jsonl file; got an empty list")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"dataset file not found: {path}")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"dataset directory {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.suffix in _TEXT_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(
                f"unsupported dataset file {path}: expected a .txt (one document) or .jsonl (one document per "
                f"line) file"
            )
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"dataset file {path} is not valid UTF-8 ({err})") from err


def _read_documents(path: Path, text_field: str) -> list[str]:
    """Documents of one file: the whole `.txt` file, or the `text_field` of each JSONL line."""
    content = _read_text(path)
    if not content.strip():
        raise ValueError(f"dataset file {path} is empty (no text)")
    if path.suffix == ".txt":
        return [content]
    docs: list[str] = []
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        record = parse_jsonl_line(line, f"{path}:{line_no}")
        if not isinstance(record, dict) or text_field not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}:{line_no}: JSON record has no field {text_field!r} (found {found}); "
                f"set text_field to the name of the text field"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{line_no}: field {text_field!r} must be a string, got {type(text).__name__}"
            )
        if text:
            docs.append(text)
    if not docs:
        raise ValueError(f"dataset file {path} has no text: every {text_field!r} field is empty")
    return docs


class TextDataset:
    """Local `.txt` / `.jsonl` documents, tokenized and packed into fixed windows with their boundaries.

    Samples are packed as Note [Packed documents] in :mod:`cp_dtensor.data.packing` says; the whole
    corpus is tokenized into memory, so this class suits small corpora and tests. The trainer reads
    ``data.dataset = "text"`` through the memory-mapped token cache instead (Note [Token cache]).

    Args:
        paths: A file, a directory (its `.txt` and `.jsonl` files, sorted) or a list of them. A `.txt` file is
            one document; a `.jsonl` file has one JSON object per line with the text in `text_field`
            (blank lines are skipped).
        seq_len: Tokens per sample.
        text_field: JSONL field holding the text.
        tokenizer: The tokenizer (its `BOS`/`EOS` wrap each document); None means `ByteTokenizer()`.
        reset_positions: Positions restart at 0 at each document start (see the Note).

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: Unsupported suffix, empty file or no text, invalid JSON line or missing field (file and
            line named), or fewer than `seq_len + 1` tokens in the whole corpus.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        seq_len: int,
        *,
        text_field: str = "text",
        tokenizer: Tokenizer | None = None,
        reset_positions: bool = False,
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.reset_positions = reset_positions
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.files = _expand_paths(paths)
        stream: list[int] = []
        starts: list[int] = []
        for path in self.files:
            docs = _read_documents(path, text_field)
            for first in range(0, len(docs), _ENCODE_CHUNK):
                for ids in self.tokenizer.encode_batch(
                    docs[first : first + _ENCODE_CHUNK], bos=True, eos=True
                ):
                    starts.append(len(stream))
                    stream.extend(ids)
        self.num_documents = len(starts)
        needed = seq_len + 1
        if len(stream) < needed:
            raise ValueError(
                f"corpus {[str(p) for p in self.files]} has {len(stream)} tokens ({self.tokenizer.name} tokenizer, "
                f"BOS/EOS included), but one sample of seq_len={seq_len} needs {needed}; add text or lower seq_len"
            )
        self.vocab_size = self.tokenizer.vocab_size
        dtype = torch.int16 if self.vocab_size <= 2**15 else torch.int32  # bytes (258 ids) fit in int16
        self.tokens = torch.tensor(stream, dtype=dtype)  # (N,)
        self.document_starts = torch.tensor(starts, dtype=torch.int64)  # (num_documents,) stream offsets

    @property
    def num_tokens(self) -> int:
        """Length of the packed token stream."""
        return self.tokens.numel()

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, index: int) -> Sample:
        """Sample `index`: the window starting at `index * seq_len` (Note [Packed documents]).

        Args:
            index: In [0, len(self)).

        Returns:
            `{"tokens", "labels", "positions", "document_ids"}`, each (seq_len,) int64.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a dataset of {len(self)} samples")
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1].to(torch.int64)  # (S + 1,)
        low = int(torch.searchsorted(self.document_starts, start, right=True))
        high = int(torch.searchsorted(self.document_starts, start + self.seq_len))
        starts = self.document_starts[low:high] - start  # (K,) document starts inside the sample
        return pack_window(window, starts, reset_positions=self.reset_positions)
