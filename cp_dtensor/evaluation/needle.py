"""Needle in a haystack: a pass key hidden at a given depth of real text, asked for at the end.

Note [Needle in a haystack]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
One sample of context length L and depth d (0 = the start, 1 = just before the question)::

    [BOS] filler ......... [needle] ................ filler [question] -> greedy answer
          |<-- d x F tokens -->|                            F = L - 1 - |needle| - |question|
    needle:   " The pass key is 71432. Remember it. 71432 is the pass key."
    question: " What is the pass key? The pass key is"

The filler is real text (the Python reference manual that ships with CPython, ``pydoc_data.topics``),
taken from a position that depends on the sample, so samples differ in their haystack as well as their
key. The answer is the model's greedy continuation, generated under CP by :func:`cp_dtensor.generate`;
it is correct when its first run of digits is the key. Every token count is exact: the pieces are
tokenized separately and concatenated, so a sample is exactly L tokens.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["NeedleSample", "build_samples", "cell_score", "haystack_text", "score", "summary_table"]

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class NeedleSample:
    """One prompt of the evaluation and, once answered, its result.

    Attributes:
        length: context length in tokens (the prompt).
        depth: where the needle sits in the filler, 0 (start) .. 1 (end).
        index: the sample's number in its (length, depth) cell.
        expected: the pass key.
        tokens: the prompt's token ids.
        predicted: the answer's first run of digits ("" before answering or when there is none).
        answer: the decoded continuation.
    """

    length: int
    depth: float
    index: int
    expected: str
    tokens: list[int]
    predicted: str = ""
    answer: str = ""

    @property
    def correct(self) -> bool:
        """Whether the answer's first digits are the key."""
        return self.predicted == self.expected

    @property
    def digits_correct(self) -> float:
        """The share of the key's digits the prediction has in the right places (partial retrieval)."""
        return sum(a == b for a, b in zip(self.expected, self.predicted)) / len(self.expected)

    def record(self) -> dict[str, Any]:
        """The JSON record (without the prompt's tokens)."""
        out = asdict(self)
        out.pop("tokens")
        out["correct"] = self.correct
        out["digits_correct"] = self.digits_correct
        return out


def haystack_text(path: str | Path | None = None) -> str:
    """The filler text: a file's contents, or the Python reference manual shipped with CPython."""
    if path is not None:
        return Path(path).read_text()
    from pydoc_data.topics import topics

    return "\n\n".join(" ".join(topics[name].split()) for name in sorted(topics))


def build_samples(
    tokenizer: Any,
    lengths: list[int],
    depths: list[float],
    samples: int,
    *,
    seed: int = 0,
    haystack: str | None = None,
    bos_id: int | None = None,
) -> list[NeedleSample]:
    """Every (length, depth, sample) prompt (Note [Needle in a haystack]).

    Args:
        tokenizer: with ``encode(text) -> list[int]`` (``cp_dtensor.data.load_tokenizer``).
        lengths: context lengths in tokens.
        depths: needle depths in [0, 1].
        samples: prompts per (length, depth).
        seed: draws the keys and the filler offsets.
        haystack: filler text (default :func:`haystack_text`).
        bos_id: a first token, or None for none.

    Raises:
        ValueError: a length too short for the needle and the question, or a depth outside [0, 1].
    """
    filler = tokenizer.encode(haystack if haystack is not None else haystack_text())
    question = tokenizer.encode(QUESTION)
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle depths must be in [0, 1], got {depth}.")
            for index in range(samples):
                key = str(int(torch.randint(10000, 100000, (), generator=g)))
                needle = tokenizer.encode(NEEDLE.format(key=key))
                room = length - len(needle) - len(question) - (bos_id is not None)
                if room < 1 or room > len(filler):
                    raise ValueError(
                        f"context length {length} leaves {room} filler tokens (needle {len(needle)} + question "
                        f"{len(question)} tokens; the haystack has {len(filler)}): pick lengths in "
                        f"({len(needle) + len(question) + 1}, {len(filler)}]."
                    )
                start = int(torch.randint(0, len(filler) - room + 1, (), generator=g))
                text = filler[start : start + room]
                at = round(depth * room)
                ids = ([bos_id] if bos_id is not None else []) + text[:at] + needle + text[at:] + question
                assert len(ids) == length
                out.append(NeedleSample(length, depth, index, key, ids))
    return out


def score(sample: NeedleSample, answer: str) -> None:
    """Record ``answer`` on ``sample``: its first run of digits is the prediction."""
    sample.answer = answer
    match = re.search(r"\d+", answer)
    sample.predicted = match.group(0) if match else ""


def cell_score(samples: list[NeedleSample], metric: str = "exact") -> float:
    """Mean of ``metric`` over ``samples``: "exact" (the whole key) or "digits" (digits in place)."""
    values = [float(s.correct) if metric == "exact" else s.digits_correct for s in samples]
    return sum(values) / len(values)


def summary_table(samples: list[NeedleSample], metric: str = "exact") -> str:
    """A markdown table of ``metric`` (:func:`cell_score`) per context length (rows) and depth (columns)."""
    lengths = sorted({s.length for s in samples})
    depths = sorted({s.depth for s in samples})
    head = "| length \\ depth | " + " | ".join(f"{d:.2f}" for d in depths) + " | all |"
    rows = [head, "|" + "---|" * (len(depths) + 2)]
    for length in lengths:
        cells = []
        for depth in depths:
            cell = [s for s in samples if s.length == length and s.depth == depth]
            cells.append(f"{cell_score(cell, metric):.2f}")
        row = [s for s in samples if s.length == length]
        rows.append(f"| {length} | " + " | ".join(cells) + f" | {cell_score(row, metric):.2f} |")
    return "\n".join(rows)
