"""The "sft" dataset: JSONL prompt/completion records, packed whole, loss on completion tokens only.

Note [Loss-masked packing]
~~~~~~~~~~~~~~~~~~~~~~~~~~
A record becomes ``[BOS] + prompt + completion + [EOS]``. Records are packed whole, in file order, into
samples of ``seq_len`` tokens (a record that does not fit in what is left of a sample starts the next one;
the rest is padding; a record longer than a sample keeps its completion and loses the start of its prompt,
as SFT truncation does: the tokens the loss counts survive). Each token's label is the
next token *of its own record*, and it is counted only when that next token belongs to the completion (its
EOS included); prompt tokens, a record's last token and padding get ``IGNORE_INDEX``. seq_len 12, records
(p, c) and (q, d)::

    tokens        B p p p c c E B q q d E       (B = BOS, E = EOS)
    labels        . . . c c E . . . d E .       (. = IGNORE_INDEX, not counted)
    document_ids  0 0 0 0 0 0 0 1 1 1 1 1       (padding would get the next id)
    positions     0 1 ... 11                    (reset_positions: 0 1 2 3 4 5 6 0 1 2 3 4)

With ``model.attention_mask = "document_causal"`` a record sees only itself, so the loss of a sample is the
sum of each record's own completion loss. The trainer divides the summed loss by the number of counted
labels of the whole global batch (Note [Global token mean]), over any dp x cp layout, so the result is
the mean over completion tokens whatever the sharding.

Storage: records are read line by line and tokenized a few thousand at a time; the packed records live in
id arrays of the smallest dtype that holds the vocabulary (one per batch of records, never concatenated)
with three small tables, so memory is about 2-4 bytes per token (no Python int per token, no record text
kept)::

    ids            [ record 0 | record 1 | ... ] [ record 4096 | ... ] ...     uint16 / uint32
    record_start   0, n0, n0 + n1, ...                          int64, records + 1
    prompt_len     prompt tokens of each record (BOS included)  int64, records
    sample_first   first record of each sample                  int64, samples + 1
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from cp_dtensor.data.common import IGNORE_INDEX, Sample, document_positions, parse_jsonl_line
from cp_dtensor.data.token_cache import token_dtype
from cp_dtensor.data.tokenizer import ByteTokenizer, Tokenizer, encode_flat

__all__ = ["SFTDataset", "iter_sft_records", "read_sft_records"]

_RECORDS_PER_BATCH = 4096  # records tokenized per encode call


def _sft_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The JSONL files of ``paths`` (a folder stands for its ``.jsonl`` files, sorted)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if not item.exists():
            raise FileNotFoundError(f"data.paths: {item} does not exist")
        files.extend(sorted(item.glob("*.jsonl")) if item.is_dir() else [item])
    for file in files:
        if file.suffix != ".jsonl":
            raise ValueError(f'dataset "sft" reads JSONL files (one record per line); got {file}')
    return files


def iter_sft_records(
    paths: str | Path | Sequence[str | Path], prompt_field: str, completion_field: str
) -> Iterator[tuple[str, str]]:
    """``(prompt, completion)`` of every record of the JSONL files, in order, one line read at a time.

    Args:
        paths: JSONL files (a folder stands for its ``.jsonl`` files, sorted).
        prompt_field: The field holding the prompt.
        completion_field: The field holding the completion.

    Yields:
        The records.

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: Not JSONL, an invalid line, or a missing or non-string field (file and line named).
    """
    for file in _sft_files(paths):
        with file.open(encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record = parse_jsonl_line(line, f"{file}:{line_no}")
                values = []
                for name in (prompt_field, completion_field):
                    value = record.get(name) if isinstance(record, dict) else None
                    if not isinstance(value, str):
                        found = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(
                            f"{file}:{line_no}: record has no string field {name!r} (found {found}); set "
                            f"data.sft_prompt_field / data.sft_completion_field to the field names"
                        )
                    values.append(value)
                yield values[0], values[1]


def read_sft_records(
    paths: str | Path | Sequence[str | Path], prompt_field: str, completion_field: str
) -> list[tuple[str, str]]:
    """Every record of :func:`iter_sft_records` in a list (small files and tests).

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: As :func:`iter_sft_records`, or no records at all.
    """
    records = list(iter_sft_records(paths, prompt_field, completion_field))
    if not records:
        raise ValueError(f'dataset "sft": no records in {[str(f) for f in _sft_files(paths)]}')
    return records


class SFTDataset:
    """Prompt/completion records packed whole into samples, labels on completions only.

    Note [Loss-masked packing].

    Args:
        paths: JSONL files (or folders of them).
        seq_len: Tokens per sample.
        prompt_field: JSONL field of the prompt.
        completion_field: JSONL field of the completion.
        tokenizer: The tokenizer (None: bytes).
        reset_positions: Positions restart at 0 with each record.

    Attributes:
        num_documents: Records read.
        num_truncated: Records cut to ``seq_len`` tokens (their prompts lose their first tokens).
        num_counted: Labels counted over the whole dataset (completion tokens and their EOS).
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        seq_len: int,
        *,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        tokenizer: Tokenizer | None = None,
        reset_positions: bool = False,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self.reset_positions = reset_positions
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        dtype = token_dtype(self.tokenizer.vocab_size)
        id_parts: list[np.ndarray] = []
        record_len: list[int] = []
        prompt_len: list[int] = []
        sample_first = [0]
        used = 0  # tokens in the sample being filled
        self.num_truncated = 0
        records = iter_sft_records(paths, prompt_field, completion_field)
        while batch := list(islice(records, _RECORDS_PER_BATCH)):
            prompt_ids, prompt_lens = encode_flat(self.tokenizer, [p for p, _ in batch], bos=True, eos=False)
            completion_ids, completion_lens = encode_flat(
                self.tokenizer, [c for _, c in batch], bos=False, eos=True
            )
            prompt_ends, completion_ends = np.cumsum(prompt_lens), np.cumsum(completion_lens)
            pieces: list[np.ndarray] = []
            for j in range(len(batch)):
                prompt = prompt_ids[prompt_ends[j] - prompt_lens[j] : prompt_ends[j]]
                completion = completion_ids[completion_ends[j] - completion_lens[j] : completion_ends[j]]
                if len(prompt) + len(completion) > seq_len:  # keep the completion: cut the prompt's start
                    self.num_truncated += 1
                    keep = max(0, seq_len - len(completion))
                    prompt = prompt[len(prompt) - keep :]
                    completion = completion[:seq_len]
                n = len(prompt) + len(completion)
                if used + n > seq_len:
                    sample_first.append(len(record_len))
                    used = 0
                pieces += [prompt, completion]
                record_len.append(n)
                prompt_len.append(len(prompt))
                used += n
            id_parts.append(np.concatenate(pieces).astype(dtype))
        if not record_len:
            raise ValueError(f'dataset "sft": no records in {[str(f) for f in _sft_files(paths)]}')
        sample_first.append(len(record_len))
        self._id_parts = id_parts  # every record's ids, one after the other, in parts (no concatenated copy)
        self._part_start = np.concatenate([[0], np.cumsum([len(part) for part in id_parts])])  # (parts + 1,)
        lengths = np.asarray(record_len, dtype=np.int64)
        self._record_start = np.concatenate([[0], np.cumsum(lengths)])  # (records + 1,)
        self._prompt_len = np.asarray(prompt_len, dtype=np.int64)  # (records,)
        self._sample_first = np.asarray(sample_first, dtype=np.int64)  # (samples + 1,)
        self.num_documents = len(record_len)
        # labels [first, n - 1) of a record are counted, first = max(prompt_len - 1, 0)
        self.num_counted = int((lengths - 1 - np.maximum(self._prompt_len - 1, 0)).sum())
        if self.num_counted == 0:
            raise ValueError(
                f'dataset "sft": no completion token is counted (every completion is empty or cut off at seq_len '
                f"{seq_len}); raise training.seq_len or check data.sft_completion_field"
            )

    def __len__(self) -> int:
        return len(self._sample_first) - 1

    def __getitem__(self, index: int) -> Sample:
        """Sample ``index`` (Note [Loss-masked packing]).

        Args:
            index: In [0, len(self)).

        Returns:
            ``{"tokens", "labels", "positions", "document_ids"}``, each (seq_len,) int64.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a dataset of {len(self)} samples")
        seq = self.seq_len
        first, last = int(self._sample_first[index]), int(self._sample_first[index + 1])
        base = int(self._record_start[first])
        tokens = torch.full((seq,), self.tokenizer.EOS, dtype=torch.int64)  # (S,) padding: EOS
        labels = torch.full((seq,), IGNORE_INDEX, dtype=torch.int64)  # (S,)
        document_ids = torch.empty(seq, dtype=torch.int64)  # (S,)
        used = int(self._record_start[last]) - base
        tokens[:used] = torch.from_numpy(self._read_ids(base, base + used))
        for doc, record in enumerate(range(first, last)):
            start, stop = int(self._record_start[record]) - base, int(self._record_start[record + 1]) - base
            document_ids[start:stop] = doc
            # label of token j is token j + 1 of the record, counted when j + 1 is a completion token
            counted_from = start + max(int(self._prompt_len[record]) - 1, 0)
            labels[counted_from : stop - 1] = tokens[counted_from + 1 : stop]
        document_ids[used:] = last - first  # padding: its own document
        positions = document_positions(document_ids) if self.reset_positions else torch.arange(seq)
        return {"tokens": tokens, "labels": labels, "positions": positions, "document_ids": document_ids}

    def _read_ids(self, start: int, stop: int) -> np.ndarray:
        """Ids ``[start, stop)`` of the records' concatenation, as (stop - start,) int64."""
        first = int(np.searchsorted(self._part_start, start, side="right")) - 1
        last = int(np.searchsorted(self._part_start, stop, side="left"))  # parts [first, last) overlap
        pieces = []
        for part in range(first, last):
            offset = int(self._part_start[part])
            pieces.append(self._id_parts[part][max(start - offset, 0) : stop - offset])
        return np.concatenate(pieces).astype(np.int64)
