"""Communication replaced by local copies, so the same ring code runs its compute without communication.

* :class:`LocalCopyTransport` - cp_dtensor's ring with every transfer a local copy of the right shape,
* :class:`LocalCollectivesMode` - PyTorch's functional collectives answered by local copies.

The values the ring computes on these are wrong; the shapes, dtypes and memory traffic are those of the real
ring (see Note [Hidden communication] in :mod:`cp_dtensor.tools.bench.overlap`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cp_dtensor.attention.transport import Pending, Transport
from cp_dtensor.tools.bench.meters import functional_collective_op

__all__ = ["LocalCollectivesMode", "LocalCopyTransport"]


class LocalCopyTransport(Transport):
    """A transport whose transfers are local copies of the right shape (no process group involved).

    ``send_recv`` receives a copy of the last tensor this rank sent with that tag when the shapes match
    (zeros otherwise), ``all_gather`` ``size`` copies, ``reduce_scatter`` a copy of this
    rank's entry. The values are wrong, the shapes, dtypes and memory traffic are those of the real ring:
    running cp_dtensor's ring code on it times the compute (plus the copies) without communication.
    """

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size
        self.bytes_sent = 0
        self._last: dict[int, torch.Tensor] = {}

    def send_recv(self, send, recv_shape, dtype, device, tag):
        if send is not None:
            self._last[tag] = send
        if recv_shape is None:
            return Pending(lambda: None)
        out = torch.zeros(recv_shape, dtype=dtype, device=device)
        last = self._last.get(tag)
        if last is not None and tuple(last.shape) == tuple(recv_shape):
            out.copy_(last)
        return Pending(lambda: out)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0).expand(self.size, *tensor.shape).clone()

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.rank].clone()


class LocalCollectivesMode(TorchDispatchMode):
    """Answer PyTorch's functional collectives (what its ring rotaters use) with local copies.

    ``all_to_all_single`` returns a copy of its input, ``all_gather_into_tensor`` ``group_size`` copies,
    ``wait_tensor`` its argument: PyTorch's ring loop then runs its compute without communication.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is functional_collective_op("all_to_all_single"):
            return args[0].clone()
        if func is functional_collective_op("all_gather_into_tensor"):
            x, group_size = args[0], args[1]
            return (
                x.unsqueeze(0)
                .expand(group_size, *x.shape)
                .reshape(group_size * x.shape[0], *x.shape[1:])
                .clone()
            )
        if func is functional_collective_op("wait_tensor"):
            return args[0]
        return func(*args, **kwargs)
