"""Global batches: batch k of a map-style dataset is a pure function of (dataset, seed, k)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from cp_dtensor.data.common import Sample
from cp_dtensor.data.shuffle import permute_indices

ORDER = "feistel-4"
"""The sample order's algorithm (Note [Index permutation without a table]); bump it when the order changes."""

__all__ = ["ORDER", "GlobalBatchLoader", "MapDataset"]


class MapDataset(Protocol):
    """What `GlobalBatchLoader` needs: `len()` and samples by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class GlobalBatchLoader:
    """Deterministic global batches: batch k depends only on (dataset, seed, k), never on the parallel degrees.

    The sample slots of batch k are `k * G ... (k + 1) * G - 1` of an endless stream that visits the dataset
    epoch after epoch; slot j reads sample `p_e(j % N)` with `e = j // N` and `p_e` the permutation of
    `range(N)` that (seed, e) selects (Note [Index permutation without a table]; identity when
    `shuffle=False`). A batch may straddle two epochs. The loader is an endless iterator; `state_dict()`
    holds the number of batches consumed, so a resumed run continues with exactly the next batch.

    With `dp_degree > 1` the loader yields only the rows of data-parallel rank `dp_rank`: rows
    `dp_rank * G / dp ... (dp_rank + 1) * G / dp - 1` of the global batch (the contiguous row block that
    `shard_batch` gives that rank), so each rank reads only its share of the data::

        global batch k:  row 0  row 1 | row 2  row 3        G = 4, dp = 2
                         dp rank 0    | dp rank 1

    Args:
        dataset: Map-style dataset of `{"tokens", "labels", "positions"}` samples (plus any other (S,)
            entries, e.g. `document_ids`, the same names in every sample).
        global_batch_size: Samples per global batch (all data-parallel ranks together).
        seed: Shuffling seed.
        shuffle: Shuffle sample indices each epoch.
        dp_rank: This rank's index on the data-parallel axis.
        dp_degree: Data-parallel ranks; must divide `global_batch_size`.
    """

    def __init__(
        self,
        dataset: MapDataset,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        dp_rank: int = 0,
        dp_degree: int = 1,
    ) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if len(dataset) <= 0:
            raise ValueError("GlobalBatchLoader got an empty dataset")
        if dp_degree < 1 or not 0 <= dp_rank < dp_degree or global_batch_size % dp_degree:
            raise ValueError(
                f"GlobalBatchLoader: dp_rank {dp_rank} of dp_degree {dp_degree} does not split "
                f"global_batch_size {global_batch_size}; use a dp_degree that divides it"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.batches_consumed = 0

    def sample_indices(self, batch_index: int) -> list[int]:
        """Dataset indices of the samples of global batch `batch_index`, in row order (all dp ranks).

        Args:
            batch_index: Non-negative batch number.

        Returns:
            `global_batch_size` dataset indices.
        """
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        return self._indices(batch_index * self.global_batch_size, (batch_index + 1) * self.global_batch_size)

    def local_sample_indices(self, batch_index: int) -> list[int]:
        """Dataset indices of this dp rank's rows of global batch `batch_index`.

        Args:
            batch_index: Non-negative batch number.

        Returns:
            `global_batch_size / dp_degree` dataset indices.
        """
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        per = self.global_batch_size // self.dp_degree
        first = batch_index * self.global_batch_size + self.dp_rank * per
        return self._indices(first, first + per)

    def _indices(self, first_slot: int, stop_slot: int) -> list[int]:
        n = len(self.dataset)
        slots = np.arange(first_slot, stop_slot, dtype=np.int64)
        epochs, within = np.divmod(slots, n)
        if not self.shuffle:
            return within.tolist()
        out = np.empty_like(within)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            out[here] = permute_indices(within[here], n, seed=self.seed, epoch=epoch)
        return out.tolist()

    def get_batch(self, batch_index: int) -> Sample:
        """This dp rank's rows of global batch `batch_index` (all of it when `dp_degree` is 1); does not
        move the iterator.

        Args:
            batch_index: Non-negative batch number.

        Returns:
            The samples' entries stacked (`tokens`, `labels`, `positions`, and `document_ids` where the
            dataset has them), each (G / dp_degree, S) int64.

        Raises:
            ValueError: The samples of the batch do not have the same entries.
        """
        indices = self.local_sample_indices(batch_index)
        samples = [self.dataset[i] for i in indices]
        keys = list(samples[0])
        for index, sample in zip(indices, samples):
            if set(sample) != set(keys):
                raise ValueError(
                    f"dataset samples disagree on their entries: sample {indices[0]} has {sorted(keys)}, sample "
                    f"{index} has {sorted(sample)}; a dataset must return the same entries for every index"
                )
        return {key: torch.stack([s[key] for s in samples]) for key in keys}

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        batch = self.get_batch(self.batches_consumed)
        self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Loader position and the settings it depends on.

        Returns:
            `{"batches_consumed", "seed", "global_batch_size", "num_samples", "shuffle", "order"}`; ``order``
            names the shuffle algorithm (:data:`ORDER`), so a checkpoint never resumes into another order.
        """
        return {
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": len(self.dataset),
            "shuffle": self.shuffle,
            "order": ORDER,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position.

        Args:
            state: From `state_dict()`.

        Raises:
            ValueError: The saved seed, batch size, dataset length or shuffle flag differ from this loader's
                (the batch numbering would then mean different data).
        """
        current = self.state_dict()
        if self.shuffle and state.get("order") != ORDER:
            raise ValueError(
                f"cannot resume data loader: the checkpoint's batches were drawn in order "
                f"{state.get('order', 'randperm (before the table-free shuffle)')!r}, this version draws them in "
                f"order {ORDER!r}; resuming would feed other batches than the checkpointed run would have seen. "
                f"Resume with the version that wrote the checkpoint, or start a new run (e.g. from its weights: "
                f"checkpoint.initial_load_path)."
            )
        for key in ("seed", "global_batch_size", "num_samples", "shuffle"):
            if key in state and state[key] != current[key]:
                raise ValueError(
                    f"cannot resume data loader: checkpoint has {key}={state[key]!r} but this loader has "
                    f"{key}={current[key]!r}; use the same data settings as the checkpointed run"
                )
        consumed = int(state["batches_consumed"])
        if consumed < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {consumed}")
        self.batches_consumed = consumed
