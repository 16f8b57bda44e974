"""Measure memory: what a forward keeps alive for backward, and the peak of live bytes inside a block.

Note [Live-bytes tracker]
~~~~~~~~~~~~~~~~~~~~~~~~~
CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``, so :func:`track_live_bytes`
watches every op output inside a block (a ``TorchDispatchMode``) and keeps a weak reference to its storage::

    op output -> storage (data_ptr, nbytes, weak ref)   new storage: live += nbytes
    before each op: storages whose weak ref expired      freed:       live -= nbytes
    peak = max(live) over the block

Only storages created inside the block count (the inputs are the baseline), so the peak is the block's
transient memory; a storage kept alive by autograd for backward stays live, as it should.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes", "SavedTensorCounter", "count_saved_tensors", "track_live_bytes"]


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


class LiveBytes(TorchDispatchMode):
    """The live-bytes tracker of Note [Live-bytes tracker]; use through :func:`track_live_bytes`.

    Attributes:
        current: bytes of the storages created in the block that are still alive.
        peak: the largest ``current`` seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for ptr, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[ptr]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self._live:
                    self._live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@contextmanager
def track_live_bytes() -> Iterator[LiveBytes]:
    """Context manager: the peak of live bytes allocated by ops inside the block (CPU or any device)."""
    tracker = LiveBytes()
    with tracker:
        yield tracker
    tracker._sweep()
