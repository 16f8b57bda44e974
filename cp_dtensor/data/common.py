"""What every dataset shares: the sample format, the ignored-label value, seeds, positions, id checks."""

import hashlib
import json

import torch

__all__ = [
    "IGNORE_INDEX",
    "RECALL_CUE_START_FRACTION",
    "Sample",
    "document_positions",
    "parse_jsonl_line",
    "validate_token_ids",
]

IGNORE_INDEX = -100
"""Label value that the loss ignores (`F.cross_entropy(..., ignore_index=-100)`)."""

Sample = dict[str, torch.Tensor]

RECALL_CUE_START_FRACTION = 0.25
"""Where the trainers start the synthetic recall task's cue region: from S/4, which is on another CP rank
than the last positions (the queries) for any cp >= 2 under zigzag or contiguous (Note [Recall across CP
ranks] in cp_dtensor.trainer.builders)."""


def _mix_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a stable (platform- and process-independent) function of `parts`."""
    text = ":".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the document id changes along the last dim.

    Args:
        document_ids: (..., S) integer ids; a document is a run of equal ids.

    Returns:
        (..., S) int64: each token's offset from the first token of its run.

    Example:
        >>> document_positions(torch.tensor([0, 0, 0, 1, 1, 2]))
        tensor([0, 1, 2, 0, 1, 0])
    """
    seq_len = document_ids.shape[-1]
    index = torch.arange(seq_len, device=document_ids.device).expand_as(document_ids)  # (..., S)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)  # (..., S)
    is_start[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    run_start = torch.where(is_start, index, 0).cummax(dim=-1).values  # (..., S) start of each token's run
    return index - run_start


def validate_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Check that every id is in [0, vocab_size) (an out-of-range id crashes or corrupts the embedding).

    Args:
        tokens: Integer tensor of any shape.
        vocab_size: The model's vocabulary size.

    Raises:
        ValueError: Naming the first bad id and the vocab size.
    """
    if tokens.numel() == 0:
        return
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        first = int(tokens[bad].flatten()[0])
        raise ValueError(
            f"token id {first} is outside [0, {vocab_size}) (vocab_size={vocab_size}); use a model vocab_size "
            f"> {int(tokens.max())} or fix the data"
        )


def parse_jsonl_line(line: str | bytes, where: str) -> object:
    """The JSON value of one JSONL line; ``where`` (file and line) names it in the error.

    Raises:
        ValueError: ``"{where}: line is not valid JSON (...)"``, or not valid UTF-8 (bytes).
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: line is not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not valid UTF-8 ({err.reason})") from None
