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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from cp_dtensor.data.common import IGNORE_INDEX, Sample, document_positions
from cp_dtensor.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = ["SFTDataset", "read_sft_records"]


def read_sft_records(
    paths: str | Path | Sequence[str | Path], prompt_field: str, completion_field: str
) -> list[tuple[str, str]]:
    """``(prompt, completion)`` of every record of the JSONL files, in order.

    Args:
        paths: JSONL files (a folder stands for its ``.jsonl`` files, sorted).
        prompt_field: The field holding the prompt.
        completion_field: The field holding the completion.

    Returns:
        The records.

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: Not JSONL, an invalid line, a missing or non-string field (file and line named), or no
            records at all.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if not item.exists():
            raise FileNotFoundError(f"data.paths: {item} does not exist")
        files.extend(sorted(item.glob("*.jsonl")) if item.is_dir() else [item])
    records: list[tuple[str, str]] = []
    for file in files:
        if file.suffix != ".jsonl":
            raise ValueError(f'dataset "sft" reads JSONL files (one record per line); got {file}')
        for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{line_no}: line is not valid JSON ({e.msg})") from None
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
            records.append((values[0], values[1]))
    if not records:
        raise ValueError(f'dataset "sft": no records in {[str(f) for f in files]}')
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
        records = read_sft_records(paths, prompt_field, completion_field)
        prompts = self.tokenizer.encode_batch([p for p, _ in records], bos=True)
        completions = self.tokenizer.encode_batch([c for _, c in records], eos=True)
        self.num_documents = len(records)
        self.num_truncated = 0
        samples: list[list[tuple[list[int], int]]] = [[]]  # per sample: (record tokens, prompt length)
        used = 0
        for prompt, completion in zip(prompts, completions):
            if len(prompt) + len(completion) > seq_len:  # keep the completion: cut the prompt's start
                self.num_truncated += 1
                keep = max(0, seq_len - len(completion))
                prompt = prompt[len(prompt) - keep :] if keep else []
                completion = completion[:seq_len]
            ids = prompt + completion
            if used + len(ids) > seq_len:
                samples.append([])
                used = 0
            samples[-1].append((ids, len(prompt)))
            used += len(ids)
        self._samples = samples
        self.num_counted = sum(int((self[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(self)))
        if self.num_counted == 0:
            raise ValueError(
                f'dataset "sft": no completion token is counted (every completion is empty or cut off at seq_len '
                f"{seq_len}); raise training.seq_len or check data.sft_completion_field"
            )

    def __len__(self) -> int:
        return len(self._samples)

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
        tokens = torch.full((seq,), self.tokenizer.EOS, dtype=torch.int64)  # (S,) padding: EOS
        labels = torch.full((seq,), IGNORE_INDEX, dtype=torch.int64)  # (S,)
        document_ids = torch.empty(seq, dtype=torch.int64)  # (S,)
        start = 0
        records = self._samples[index]
        for doc, (ids, prompt_len) in enumerate(records):
            n = len(ids)
            record = torch.tensor(ids, dtype=torch.int64)  # (n,)
            tokens[start : start + n] = record
            document_ids[start : start + n] = doc
            # label of token j is token j + 1 of the record, counted when j + 1 is a completion token
            first = max(prompt_len - 1, 0)
            labels[start + first : start + n - 1] = record[first + 1 :]
            start += n
        document_ids[start:] = len(records)  # padding: its own document
        positions = document_positions(document_ids) if self.reset_positions else torch.arange(seq)
        return {"tokens": tokens, "labels": labels, "positions": positions, "document_ids": document_ids}
