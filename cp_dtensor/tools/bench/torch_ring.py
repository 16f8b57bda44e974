"""PyTorch's own ring-attention loop, driven with the CPU flash op (the variant we compare against).

PyTorch's context parallelism (``torch.distributed.tensor.experimental._context_parallel``) runs
``_templated_ring_attention`` (+ ``_backward``) with a rotater (all-to-all or all-gather) and, for causal
attention, the head-tail load balancer, which assigns the same chunks as cp_dtensor's zigzag layout. Its
options are module-global; :func:`torch_cp_options` sets them for one block in the benchmark process only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "CPU_FLASH_BWD",
    "CPU_FLASH_FWD",
    "TorchRingAttention",
    "TorchRingSpec",
    "torch_cp_options",
    "torch_head_tail_indices",
    "torch_ring_backward",
    "torch_ring_forward",
    "torch_rotater_comm_only",
]

CPU_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
CPU_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _torch_cp_attention() -> ModuleType:
    """PyTorch's private CP attention module (imported on first use)."""
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention


@contextlib.contextmanager
def torch_cp_options(rotate_method: str, load_balance: bool) -> Iterator[None]:
    """Set PyTorch's module-global CP options for the block (benchmark process only), then restore them."""
    tcp = _torch_cp_attention()
    old = (tcp._cp_options.rotate_method, tcp._cp_options.enable_load_balance)
    tcp.set_rotate_method(rotate_method)
    tcp._cp_options.enable_load_balance = load_balance
    try:
        yield
    finally:
        tcp._cp_options.rotate_method, tcp._cp_options.enable_load_balance = old


@dataclass
class TorchRingSpec:
    """How to call PyTorch's ring loop: group, mask, rotater, balancing and the ops.

    Attributes:
        group: the CP process group.
        causal: causal mask.
        scale: softmax scale.
        rotate_method: ``"alltoall"`` or ``"allgather"``.
        load_balance: PyTorch's head-tail load balancing (its layout of causal inputs).
        fwd_op: the attention forward op (possibly wrapped in a counter).
        bwd_op: the attention backward op.
    """

    group: dist.ProcessGroup
    causal: bool
    scale: float
    rotate_method: str
    load_balance: bool
    fwd_op: Callable[..., Any] = CPU_FLASH_FWD
    bwd_op: Callable[..., Any] = CPU_FLASH_BWD


def torch_ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: TorchRingSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's ``_templated_ring_attention`` on local shards (B, H, S_local, D); returns (out, lse)."""
    with torch_cp_options(spec.rotate_method, spec.load_balance):
        out, lse = _torch_cp_attention()._templated_ring_attention(
            spec.group, 2, spec.fwd_op, q, k, v, is_causal=spec.causal, scale=spec.scale
        )
    return out, lse


def torch_ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: TorchRingSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's ``_templated_ring_attention_backward``; returns (dq, dk, dv)."""
    with torch_cp_options(spec.rotate_method, spec.load_balance):
        dq, dk, dv = _torch_cp_attention()._templated_ring_attention_backward(
            spec.group,
            2,
            spec.bwd_op,
            dout,
            "grad_out",
            q,
            k,
            v,
            out,
            lse,
            spec.causal,
            dropout_p=0.0,
            scale=spec.scale,
        )
    return dq, dk, dv


class TorchRingAttention(torch.autograd.Function):
    """Autograd wrapper of PyTorch's ring loop; saves q, k, v, out and lse like cp_dtensor's op."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: TorchRingSpec
    ) -> torch.Tensor:
        out, lse = torch_ring_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch_ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None


def torch_rotater_comm_only(spec: TorchRingSpec, kv: torch.Tensor, dkv: torch.Tensor) -> None:
    """The messages of PyTorch's ring loop (forward + backward) in its order, without any compute.

    Args:
        spec: the loop's group and rotate method.
        kv: flat K and V of this rank, as the rotaters send them.
        dkv: flat fp32 dK/dV accumulator like ``kv``.
    """
    tcp = _torch_cp_attention()
    method = (
        tcp._RotateMethod.ALL_TO_ALL if spec.rotate_method == "alltoall" else tcp._RotateMethod.ALL_GATHER
    )
    size = dist.get_world_size(spec.group)
    rot = tcp._create_rotater(spec.group, 2, method)
    for i in range(size):  # forward
        if i > 0:
            rot.next_buffer()
        if i < size - 1:
            rot.exchange_buffers(kv)
    kv_rot = tcp._create_rotater(spec.group, 2, method)
    dkv_rot = tcp._create_rotater(spec.group, 2, tcp._RotateMethod.ALL_TO_ALL)
    for i in range(size):  # backward: KV again, dK/dV (fp32) with an all-to-all at every step
        if i > 0:
            kv_rot.next_buffer()
        if i != size - 1:
            kv_rot.exchange_buffers(kv)
        if i > 0:
            dkv_rot.next_buffer()
        dkv_rot.exchange_buffers(dkv)
    dkv_rot.next_buffer()


def torch_head_tail_indices(seq_len: int, cp: int) -> torch.Tensor:
    """Global sequence positions in the order PyTorch's head-tail load balancer lays them out, (S,)."""
    from torch.distributed.tensor.experimental._context_parallel import _HeadTailLoadBalancer

    return _HeadTailLoadBalancer(seq_len, cp, "cpu")._generate_indices()[0].to(torch.int64)
