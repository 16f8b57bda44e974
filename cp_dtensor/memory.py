"""Measure the activation memory a forward pass keeps alive for backward."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["SavedTensorCounter", "count_saved_tensors"]


def _is_parameter_data(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (``F.linear`` saves ``weight.t()``): weights, not activations."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


@dataclass
class SavedTensorCounter:
    """Bytes of the distinct storages autograd saved for backward (parameters and their views excluded).

    Attributes:
        bytes: total bytes of the distinct saved storages (a storage saved by several ops counts once).
        tensors: number of saved tensors seen (before de-duplication).
    """

    bytes: int = 0
    tensors: int = 0
    _seen: set[int] = field(default_factory=set, repr=False)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """``saved_tensors_hooks`` pack hook: account ``t`` and return it unchanged."""
        self.tensors += 1
        if _is_parameter_data(t):
            return t
        for plain in _plain_tensors(t):
            if plain.device.type == "meta":
                continue
            storage = plain.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return t


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding the data of ``t`` (inside DTensor and other wrapper subclasses)."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = [getattr(t, name) for name in names]
    return [plain for x in inner if isinstance(x, torch.Tensor) for plain in _plain_tensors(x)]


@contextmanager
def count_saved_tensors() -> Iterator[SavedTensorCounter]:
    """Context manager: every tensor saved for backward inside it is counted once by storage."""
    counter = SavedTensorCounter()
    identity: Callable[[Any], Any] = lambda t: t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, identity):
        yield counter
