"""The train spec's data loader and tokenizer: cp_dtensor's local datasets, else torchtitan's HF ones.

``training.dataset`` picks the data::

    "synthetic_recall"  SyntheticRecallDataset(seq_len, flavor vocab)  -> GlobalBatchDataLoader, no tokenizer
    "text"              PackedTokenDataset(token cache of               -> GlobalBatchDataLoader, byte tokenizer
                          training.dataset_path, seq_len)                  (for its EOS id: block_causal)
    anything else       torchtitan's build_text_dataloader             + torchtitan's HF tokenizer

Both local datasets build each global batch from (dataset, seed, batch index) alone, so runs with other
parallel degrees but the same global batch (``local_batch_size x dp``) see the same tokens. Nothing is
downloaded. "text" goes through cp_dtensor's token cache (Note [Token cache]) in
``<job.dump_folder>/token_cache``, as ``data.dataset = "text"`` does in train.py: built once with the
chunks shared out over every rank, then read sample by sample, so a rank's memory and start-up do not grow
with the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig as TorchtitanJobConfig
from torchtitan.models import llama3 as tt_llama3
from torchtitan.tools.logging import logger

from cp_dtensor.data import (
    RECALL_CUE_START_FRACTION,
    ByteTokenizer,
    GlobalBatchLoader,
    PackedTokenDataset,
    SyntheticRecallDataset,
    build_token_cache,
)

__all__ = [
    "LOCAL_DATASETS",
    "ByteTokenizerForTorchtitan",
    "GlobalBatchDataLoader",
    "build_dataloader",
    "build_tokenizer",
]

LOCAL_DATASETS = ("synthetic_recall", "text")
"""``training.dataset`` names served by cp_dtensor's datasets (they tokenize themselves)."""


class GlobalBatchDataLoader(BaseDataLoader):
    """torchtitan data loader over cp_dtensor's deterministic global batches (nothing is downloaded).

    Every ``next`` yields this data-parallel rank's ``local_batch_size`` rows of the next global batch of
    ``local_batch_size x dp_world_size`` rows, as torchtitan expects: ``({"input": tokens}, labels)``, both
    (B, S) int64, labels -100 where no loss is taken. Batches depend only on (dataset, seed, batch index),
    so runs with different parallel degrees but the same global batch see the same data.

    Args:
        dataset: a cp_dtensor map-style dataset (``SyntheticRecallDataset``, ``TextDataset``).
        local_batch_size: rows per rank and microbatch.
        dp_rank: this rank's position on torchtitan's "batch" mesh.
        dp_world_size: the size of torchtitan's "batch" mesh.
        seed: shuffling seed.
    """

    def __init__(
        self, dataset: Any, *, local_batch_size: int, dp_rank: int, dp_world_size: int, seed: int
    ) -> None:
        self.loader = GlobalBatchLoader(dataset, local_batch_size * dp_world_size, seed=seed)
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            batch = next(self.loader)
            rows = batch["tokens"].shape[0] // self.dp_world_size
            mine = slice(self.dp_rank * rows, (self.dp_rank + 1) * rows)
            yield {"input": batch["tokens"][mine]}, batch["labels"][mine]  # (B, S) each

    def state_dict(self) -> dict[str, Any]:
        """The loader position (identical on every rank)."""
        return {"global_batch_loader": self.loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved position (an empty state is a fresh start)."""
        if state_dict:
            self.loader.load_state_dict(state_dict["global_batch_loader"])


def _flavor_vocab_size(job_config: TorchtitanJobConfig) -> int:
    return tt_llama3.llama3_args[job_config.model.flavor].vocab_size


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer | None,
    job_config: TorchtitanJobConfig,
    **kwargs: Any,
) -> BaseDataLoader:
    """The train spec's data loader: ``training.dataset`` picks it.

    * ``"synthetic_recall"``: cp_dtensor's long-range recall task with the cue region placed as cp_dtensor's
      trainer places it (from S/4: on another CP rank than the queries for any cp >= 2, zigzag or not),
      so the loss drops below chance only if attention crosses CP shards; vocabulary of the model flavor.
    * ``"text"``: the byte-tokenized ``.txt`` / ``.jsonl`` files at ``training.dataset_path``, through the
      token cache in ``<job.dump_folder>/token_cache`` (:func:`_text_dataset`).
    * anything else: torchtitan's HuggingFace text loader (e.g. "c4", with ``model.hf_assets_path``).

    Raises:
        ValueError: ``"text"`` without ``training.dataset_path``, or a flavor vocabulary too small for bytes.
    """
    training = job_config.training
    seed = job_config.debug.seed or 0
    vocab_size = _flavor_vocab_size(job_config)
    if training.dataset == "synthetic_recall":
        dataset: Any = SyntheticRecallDataset(
            training.seq_len,
            vocab_size,
            seed=seed,
            cue_repeats=max(4, training.seq_len // 64),
            cue_start_fraction=RECALL_CUE_START_FRACTION,
        )
    elif training.dataset == "text":
        if not training.dataset_path:
            raise ValueError('training.dataset = "text" needs training.dataset_path (a file or a folder).')
        if ByteTokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"the byte tokenizer needs {ByteTokenizer.vocab_size} ids but flavor {job_config.model.flavor!r} "
                f"has vocab_size {vocab_size}."
            )
        dataset = _text_dataset(training.dataset_path, training.seq_len, Path(job_config.job.dump_folder))
    else:
        from torchtitan.hf_datasets.text_datasets import build_text_dataloader

        return build_text_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs)
    return GlobalBatchDataLoader(
        dataset,
        local_batch_size=training.local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        seed=seed,
    )


def _text_dataset(paths: str, seq_len: int, dump_folder: Path) -> PackedTokenDataset:
    """The byte-tokenized corpus at ``paths`` as packed samples, read from its token cache.

    Every rank of the job builds its share of the cache's chunks (or finds the cache complete), then all
    meet at barriers of the default process group; rank 0 logs the progress lines.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cache = build_token_cache(
        paths,
        tokenizer=ByteTokenizer(),
        cache_dir=dump_folder / "token_cache",
        rank=rank,
        world_size=world_size,
        barrier=dist.barrier if world_size > 1 else None,
        log=logger.info if rank == 0 else None,
    )
    return PackedTokenDataset(cache, seq_len)


class ByteTokenizerForTorchtitan(BaseTokenizer):
    """cp_dtensor's :class:`~cp_dtensor.data.ByteTokenizer` (the ``"text"`` dataset's) as a torchtitan tokenizer.

    The data loader tokenizes by itself; torchtitan's trainer needs the tokenizer for its ``eos_id``: the
    ``block_causal`` mask finds documents by EOS tokens (each document of the ``"text"`` dataset is
    ``[BOS] bytes [EOS]``, EOS = 257).
    """

    def __init__(self) -> None:
        super().__init__()
        self.byte_tokenizer = ByteTokenizer()
        self.bos_id = self.byte_tokenizer.BOS
        self.eos_id = self.byte_tokenizer.EOS

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """UTF-8 bytes, optionally wrapped in BOS / EOS."""
        return self.byte_tokenizer.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids`` (BOS / EOS dropped)."""
        return self.byte_tokenizer.decode(ids)

    def get_vocab_size(self) -> int:
        """258: 256 bytes, BOS, EOS."""
        return self.byte_tokenizer.vocab_size


def build_tokenizer(job_config: TorchtitanJobConfig) -> BaseTokenizer | None:
    """The byte tokenizer for ``"text"``, None for ``"synthetic_recall"``, else torchtitan's HF tokenizer.

    Raises:
        ValueError: ``"synthetic_recall"`` with a ``block_causal`` flavor (its rows hold no EOS tokens, so
            there are no documents to mask).
    """
    dataset = job_config.training.dataset
    if dataset == "text":
        return ByteTokenizerForTorchtitan()
    if dataset == "synthetic_recall":
        flavor = job_config.model.flavor
        if tt_llama3.llama3_args[flavor].attn_mask_type == "block_causal":
            raise ValueError(
                f"model.flavor {flavor!r} masks packed documents (block_causal, found by EOS tokens), but "
                f'training.dataset = "synthetic_recall" has no documents: use training.dataset = "text" with '
                f"training.dataset_path, or an SDPA flavor (e.g. debugmodel)."
            )
        return None
    from torchtitan.components.tokenizer import build_hf_tokenizer

    return build_hf_tokenizer(job_config)
