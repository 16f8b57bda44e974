"""Global batches: batch k of a map-style dataset is a pure function of (dataset, seed, k)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from cp_dtensor.data.common import Sample, _mix_seed

__all__ = ["GlobalBatchLoader", "MapDataset"]


class MapDataset(Protocol):
    """What `GlobalBatchLoader` needs: `len()` and samples by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class GlobalBatchLoader:
    """Deterministic global batches: batch k depends only on (dataset, seed, k).

    The sample slots of batch k are `k * G ... (k + 1) * G - 1` of an endless stream that visits the dataset
    epoch after epoch; slot j reads sample `perm_e[j % N]` with `e = j // N` and `perm_e` a permutation seeded
    by (seed, e) (identity when `shuffle=False`). A batch may straddle two epochs. The loader is an endless
    iterator; `state_dict()` holds the number of batches consumed.

    Args:
        dataset: Map-style dataset of `{"tokens", "labels", "positions"}` samples (plus any other (S,)
            entries, e.g. `document_ids`, the same names in every sample).
        global_batch_size: Samples per global batch (all data-parallel ranks together).
        seed: Shuffling seed.
        shuffle: Shuffle sample indices each epoch.
    """

    def __init__(
        self, dataset: MapDataset, global_batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if len(dataset) <= 0:
            raise ValueError("GlobalBatchLoader got an empty dataset")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_consumed = 0
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(_mix_seed("loader-epoch", self.seed, epoch))
            self._perm_cache = (epoch, torch.randperm(len(self.dataset), generator=gen))
        return self._perm_cache[1]

    def sample_indices(self, batch_index: int) -> list[int]:
        """Dataset indices of the samples of global batch `batch_index`, in row order.

        Args:
            batch_index: Non-negative batch number.

        Returns:
            `global_batch_size` dataset indices.
        """
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        n = len(self.dataset)
        indices = []
        for slot in range(batch_index * self.global_batch_size, (batch_index + 1) * self.global_batch_size):
            epoch, within = divmod(slot, n)
            indices.append(int(self._epoch_permutation(epoch)[within]) if self.shuffle else within)
        return indices

    def get_batch(self, batch_index: int) -> Sample:
        """Global batch `batch_index` (does not move the iterator).

        Args:
            batch_index: Non-negative batch number.

        Returns:
            The samples' entries stacked (`tokens`, `labels`, `positions`, and `document_ids` where the
            dataset has them), each (G, S) int64.

        Raises:
            ValueError: The samples of the batch do not have the same entries.
        """
        indices = self.sample_indices(batch_index)
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
            `{"batches_consumed", "seed", "global_batch_size", "num_samples", "shuffle"}`.
        """
        return {
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": len(self.dataset),
            "shuffle": self.shuffle,
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
