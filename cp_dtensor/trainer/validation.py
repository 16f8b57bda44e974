"""The validation loop's data: held-out documents packed as for training, the same batches at every run.

Note [Validation loss]
~~~~~~~~~~~~~~~~~~~~~~
Every ``validation.freq`` steps (and after the last one) the trainer runs the first ``validation.steps``
batches of ``validation.paths`` forward only, through the same model parts, layout, CP strategy and
pipeline schedule as training, and reports the loss per token::

    validation batch k (unshuffled, the same at every run; each dp rank reads only its rows)
      -> the training batch path: document ids, per-document positions, CP layout, shard_batch
      -> eval_step: summed CE and valid tokens, all-reduced over dp x cp (and pp)
    loss = sum over k of CE sums / sum over k of valid tokens        (a mean per token, not per batch)

The batches depend only on the files and the tokenizer, so the loss is comparable across runs, steps and
parallel degrees: cp 1 and cp 2 give the same value up to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

from cp_dtensor.config import JobConfig
from cp_dtensor.data import GlobalBatchLoader, PackedTokenDataset, build_token_cache, load_tokenizer
from cp_dtensor.trainer.builders import DataPlacement, token_cache_dir, tokenizer_name

__all__ = ["ValidationData", "build_validation_data"]


@dataclass
class ValidationData:
    """What one validation run reads.

    Attributes:
        loader: Unshuffled loader of this dp rank's rows of each validation batch.
        steps: Batches per run.
        seq_len: Tokens per sequence.
    """

    loader: GlobalBatchLoader
    steps: int
    seq_len: int


def build_validation_data(cfg: JobConfig, vocab_size: int, placement: DataPlacement) -> ValidationData:
    """The held-out corpus of ``validation.paths`` as batches (Note [Validation loss]).

    Args:
        cfg: The job config (``validation.*``; ``data.tokenizer``, ``data.jsonl_field``, ``data.cache_dir``
            and ``data.reset_positions`` as for training).
        vocab_size: The model's vocabulary size.
        placement: This rank's place for reading and building the token cache.

    Raises:
        ValueError: A tokenizer larger than the model, or files holding fewer tokens than one validation
            batch (the message names how many are needed), or what reading the files raises.
    """
    val, data = cfg.validation, cfg.data
    seq_len = val.seq_len if val.seq_len != -1 else cfg.training.seq_len
    rows = val.local_batch_size if val.local_batch_size != -1 else cfg.training.local_batch_size
    tokenizer = load_tokenizer(tokenizer_name(cfg))
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"data.tokenizer {data.tokenizer!r} uses ids up to {tokenizer.vocab_size - 1} but the model's "
            f"vocab_size is {vocab_size}; use a larger flavor or a smaller tokenizer."
        )
    cache = build_token_cache(
        val.paths,
        tokenizer=tokenizer,
        cache_dir=token_cache_dir(cfg),
        text_field=data.jsonl_field,
        rank=placement.rank,
        world_size=placement.world_size,
        barrier=placement.barrier,
        log=placement.log,
    )
    global_rows = rows * placement.dp_degree
    needed = global_rows * seq_len + 1
    if cache.num_tokens < needed:
        raise ValueError(
            f"validation.paths hold {cache.num_tokens} tokens, but one validation batch of "
            f"{placement.dp_degree} dp rank(s) x local_batch_size {rows} x seq_len {seq_len} needs {needed}; "
            f"add held-out text or lower validation.local_batch_size / validation.seq_len"
        )
    dataset = PackedTokenDataset(cache, seq_len, reset_positions=data.reset_positions)
    loader = GlobalBatchLoader(
        dataset, global_rows, shuffle=False, dp_rank=placement.dp_rank, dp_degree=placement.dp_degree
    )
    available = len(dataset) // global_rows
    steps = available if val.steps == -1 else val.steps
    if steps > available:
        raise ValueError(
            f"validation.steps={val.steps} needs {steps} batches but validation.paths hold {available} full "
            f"batches; lower validation.steps or set -1 (every full batch)"
        )
    return ValidationData(loader, steps, seq_len)
