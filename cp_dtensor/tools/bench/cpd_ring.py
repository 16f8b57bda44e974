"""cp_dtensor's ring called directly (no autograd): a whole forward + backward, or its messages alone.

Both take the transport as an argument, so the overlap measurement can run the same step on the real
transport, on local copies, or replay only the transfers (see :mod:`cp_dtensor.tools.bench.overlap`).
"""

from __future__ import annotations

from typing import Any

import torch

from cp_dtensor.attention.kernels import select_kernel
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.strategy import get_strategy
from cp_dtensor.attention.transport import DKV_TAG, KV_TAG, Transport
from cp_dtensor.tools.bench.variants import Variant

__all__ = ["cpd_comm_only", "cpd_direct_step"]


def cpd_direct_step(
    variant: Variant,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    transport: Transport,
    causal: bool,
    scale: float,
) -> None:
    """cp_dtensor's ring forward + backward called directly with ``transport`` (no autograd).

    Args:
        variant: a cp_dtensor variant (its ``comm`` and ``layout`` are used).
        q: (B, Hq, S_local, D) local query shard.
        k: (B, Hkv, S_local, D) local key shard.
        v: (B, Hkv, S_local, D) local value shard.
        dout: (B, Hq, S_local, D) gradient of the output.
        transport: real, timed or local-copy transport.
        causal: causal mask.
        scale: softmax scale.
    """
    kernel = select_kernel(q.device, q.dtype, "cpu_flash")
    algo = get_strategy(variant.comm).build(
        layout=variant.layout, mask=AttentionMask(causal), rank=transport.rank, cp=transport.size,
        s_local=q.shape[2], a2a_size=None, scale=scale, kernel=kernel,
    )  # fmt: skip
    opts: dict[str, Any] = algo.options
    out, lse = algo.forward(q, k, v, transport, **opts)
    algo.backward(dout, q, k, v, out, lse, transport, **opts)


def cpd_comm_only(
    variant: Variant, transport: Transport, kv: torch.Tensor, dkv: torch.Tensor, dkv_per_rank: torch.Tensor
) -> None:
    """The messages of cp_dtensor's ring (forward + backward) in its order, without any compute.

    Args:
        variant: which cp_dtensor variant's messages to replay.
        transport: the real transport.
        kv: (2, B, Hkv, S_local, D) packed KV, as both passes send it.
        dkv: fp32 dK/dV accumulator like ``kv`` (p2p).
        dkv_per_rank: (CP, 2, B, Hkv, S_local, D) fp32 input of the all-gather variant's reduce-scatter.
    """
    cp = transport.size
    if variant.comm == "allgather":
        transport.all_gather(kv)  # forward
        transport.all_gather(kv)  # backward re-gathers KV
        transport.reduce_scatter(dkv_per_rank)
        return

    def exchange() -> Any:
        return transport.send_recv(kv, tuple(kv.shape), kv.dtype, kv.device, KV_TAG)

    def recv_acc() -> Any:
        return transport.send_recv(None, tuple(dkv.shape), dkv.dtype, dkv.device, DKV_TAG)

    for _ in range(cp - 1):  # forward
        exchange().wait()
    sends = []
    for step in range(cp):  # backward: same order as ring_backward
        acc_in = recv_acc() if step >= 2 else None
        pending_kv = exchange() if step < cp - 1 else None
        if acc_in is not None:
            acc_in.wait()
        if step >= 1:
            sends.append(transport.send_recv(dkv, None, dkv.dtype, dkv.device, DKV_TAG))
        if pending_kv is not None:
            pending_kv.wait()
    if cp > 1:
        recv_acc().wait()
    for pending in sends:
        pending.wait()
