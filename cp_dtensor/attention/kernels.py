"""Attention kernel adapters: one small class per backend with the same ``(out, lse)`` interface.

Every adapter computes, for one block of queries against one block of keys/values,

    forward(q, k, v)  -> out (B, Hq, Sq, D) in q's dtype,  lse (B, Hq, Sq) natural-log log-sum-exp
    backward(dout, q, k, v, out, lse) -> dq (B, Hq, Sq, D), dk, dv (B, Hkv, Sk, D)

where ``out`` and ``lse`` passed to ``backward`` may be the *merged* results of a whole ring: with the
global lse the kernel recomputes the global softmax probabilities restricted to this block, so the
per-block gradients add up exactly to the full-sequence gradients.

Only two mask shapes are ever requested by the ring: no mask, and the causal lower triangle on a square
block (Sq == Sk), so the difference between top-left and bottom-right causal alignment never matters.

Packed steps (Note [Piece packing]) call the *varlen* form instead, on packed (total, heads, head_dim) rows
with flash-attn's cu_seqlens convention::

    varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k)  -> out (Tq, Hq, D),  lse (Tq, Hq)
    varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k) -> dq (Tq, Hq, D), dk, dv (Tk, Hkv, D)

    segment i: query rows cu_q[i] : cu_q[i+1]  x  key rows cu_k[i] : cu_k[i+1]   (int32, N + 1 entries)

Adapters with a native varlen kernel (CUDA flash) make one call; every other adapter runs
:meth:`AttentionKernel.varlen_forward`'s default, which stacks the segments of equal (len_q, len_k) along
the batch dim and makes one call of its own :meth:`~AttentionKernel.forward` per distinct shape.
``k``/``v`` carry Hkv heads (GQA/MQA); adapters whose kernel cannot take that shape expand the heads
locally, after communication, and sum the expanded gradients back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = [
    "KERNELS",
    "AttentionKernel",
    "CpuFlashKernel",
    "CudaCudnnKernel",
    "CudaEfficientKernel",
    "CudaFlashKernel",
    "MathKernel",
    "equal_shape_batches",
    "select_kernel",
]

_aten = torch.ops.aten


def _expand_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), head h of q uses kv head h // n_rep (SDPA's enable_gqa rule)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _reduce_kv_heads(dx: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, Hkv * n_rep, S, D) -> (B, Hkv, S, D): sum the gradients of the heads that share one kv head
    if n_rep == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // n_rep, n_rep, s, d).sum(dim=2)


def equal_shape_batches(
    cu_q: torch.Tensor, cu_k: torch.Tensor
) -> list[tuple[list[int], list[int], int, int]]:
    """Group the varlen segments by shape: ``(q_starts, k_starts, len_q, len_k)`` per distinct
    ``(len_q, len_k)``, in order of first appearance (empty segments are left out).

    Args:
        cu_q, cu_k: (N + 1,) cumulative segment starts of the packed query / key rows.
    """
    q_at, k_at = cu_q.tolist(), cu_k.tolist()
    buckets: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for i in range(len(q_at) - 1):
        lq, lk = q_at[i + 1] - q_at[i], k_at[i + 1] - k_at[i]
        if lq and lk:
            qs, ks = buckets.setdefault((lq, lk), ([], []))
            qs.append(q_at[i])
            ks.append(k_at[i])
    return [(qs, ks, lq, lk) for (lq, lk), (qs, ks) in buckets.items()]


def _rows_of(starts: Sequence[int], length: int, device: torch.device) -> torch.Tensor | slice:
    """Packed rows of equal-length segments: one slice for one segment, else a flat (n * length,) index."""
    if len(starts) == 1:
        return slice(starts[0], starts[0] + length)
    first = torch.tensor(starts, dtype=torch.int64, device=device)
    return (first[:, None] + torch.arange(length, device=device)).flatten()


def _stack(x: torch.Tensor, rows: torch.Tensor | slice, n: int) -> torch.Tensor:
    """(T, H, ...) packed rows -> (n, H, L, ...): segments along batch, the layout the dense kernels take."""
    part = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)  # (n * L, H, ...)
    return part.view(n, -1, *x.shape[1:]).transpose(1, 2)


def _unstack_into(dst: torch.Tensor, rows: torch.Tensor | slice, y: torch.Tensor) -> None:
    """Write (n, H, L, ...) segment results ``y`` into packed (T, H, ...) ``dst`` at ``rows``."""
    flat = y.transpose(1, 2).reshape(-1, *dst.shape[1:])  # (n * L, H, ...)
    if isinstance(rows, slice):
        dst[rows] = flat
    else:
        dst.index_copy_(0, rows, flat.to(dst.dtype))


@dataclass(frozen=True)
class AttentionKernel:
    """Base class of the kernel adapters; subclasses implement :meth:`forward` and :meth:`backward`.

    Attributes:
        name: the backend name (``KERNELS`` key).
        pack_pieces: whether the drivers pack each ring step's pieces into varlen calls of this adapter
            (Note [Piece packing]); the registered adapters say False, and the CP call sets it from
            ``CPSettings.piece_packing`` (:func:`cp_dtensor.attention.packing.apply_piece_packing`).
    """

    name: str = "base"
    pack_pieces: bool = False
    native_varlen: ClassVar[bool] = False
    """Whether :meth:`varlen_forward` / :meth:`varlen_backward` are one kernel call (else the default loop)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, lse)`` for one block; ``lse`` has shape (B, Hq, Sq)."""
        raise NotImplementedError

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        is_causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(dq, dk, dv)`` of one block given the (merged) ``out`` and ``lse`` of its queries."""
        raise NotImplementedError

    def varlen_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        is_causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (Tq, Hq, D), lse (Tq, Hq))`` of packed segments (module docstring); ``is_causal`` needs
        square segments. Default: one :meth:`forward` per distinct segment shape, segments stacked on batch.

        Args:
            q: (Tq, Hq, D) packed query rows; k, v: (Tk, Hkv, D) packed key / value rows.
            cu_q, cu_k: (N + 1,) int32 segment starts; max_q, max_k: the longest segments.
            is_causal: causal lower triangle in every segment; scale: softmax scale.
        """
        out = q.new_empty(q.shape)  # (Tq, Hq, D)
        lse: torch.Tensor | None = None  # (Tq, Hq), the kernel's lse dtype
        for q_starts, k_starts, lq, lk in equal_shape_batches(cu_q, cu_k):
            n = len(q_starts)
            q_rows, k_rows = _rows_of(q_starts, lq, q.device), _rows_of(k_starts, lk, q.device)
            qs, ks, vs = _stack(q, q_rows, n), _stack(k, k_rows, n), _stack(v, k_rows, n)  # (n, H, L, D)
            # (n, Hq, lq, D), (n, Hq, lq)
            o, lse_s = self.forward(qs, ks, vs, is_causal=is_causal, scale=scale)
            if lse is None:
                lse = torch.empty(q.shape[:2], dtype=lse_s.dtype, device=q.device)
            _unstack_into(out, q_rows, o)
            _unstack_into(lse, q_rows, lse_s)
        assert lse is not None, "a varlen call needs at least one non-empty segment"
        return out, lse

    def varlen_backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        is_causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq (Tq, Hq, D), dk, dv (Tk, Hkv, D))`` of packed segments given the (merged) ``out``
        (Tq, Hq, D) and ``lse`` (Tq, Hq) of their query rows. Default: one :meth:`backward` per shape.
        Rows outside every segment get zero gradients."""
        batches = equal_shape_batches(cu_q, cu_k)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (Tq, Hq, D)
        dk, dv = (torch.empty(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))  # (Tk, Hkv, D)
        if sum(len(qs) * lq for qs, _, lq, _ in batches) != q.shape[0]:  # rows outside every segment
            dq.zero_()
        if sum(len(ks) * lk for _, ks, _, lk in batches) != k.shape[0]:
            dk.zero_()
            dv.zero_()
        for q_starts, k_starts, lq, lk in batches:
            n = len(q_starts)
            q_rows, k_rows = _rows_of(q_starts, lq, q.device), _rows_of(k_starts, lk, q.device)
            grads = self.backward(
                *(_stack(t, q_rows, n) for t in (dout, q)), _stack(k, k_rows, n), _stack(v, k_rows, n),
                _stack(out, q_rows, n), _stack(lse, q_rows, n), is_causal=is_causal, scale=scale,
            )  # fmt: skip
            for dst, rows, g in zip((dq, dk, dv), (q_rows, k_rows, k_rows), grads):
                _unstack_into(dst, rows, g)
        return dq, dk, dv


@dataclass(frozen=True)
class CpuFlashKernel(AttentionKernel):
    """PyTorch's CPU flash attention (``_scaled_dot_product_flash_attention_for_cpu``); takes GQA shapes."""

    name: str = "cpu_flash"

    def forward(self, q, k, v, *, is_causal, scale):
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, is_causal, scale):
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, scale=scale
        )


@dataclass(frozen=True)
class CudaFlashKernel(AttentionKernel):
    """CUDA flash attention (``_scaled_dot_product_flash_attention``), fp16/bf16."""

    name: str = "flash"

    def forward(self, q, k, v, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep)
        out, lse, *_ = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep)
        # cum_seq_q/k must be undefined (None) for dense inputs: defined ones select the varlen kernel.
        # The philox seed/offset are read only with dropout.
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, is_causal,
            empty, empty, scale=scale,
        )  # fmt: skip
        return dq, _reduce_kv_heads(dk, n_rep), _reduce_kv_heads(dv, n_rep)

    # ---- varlen: written for torch 2.13's aten ops, NOT RUN on a GPU yet (tests/test_cuda_kernels.py) ----
    # Unlike the dense op, the varlen flash forward returns lse unpadded as (Hq, Tq) (the meta function
    # of aten._flash_attention_forward with cum_seq_q set), and its backward reads that layout back.
    # GQA: flash-attn's varlen kernels take Hkv < Hq directly (as torch.nn.attention.varlen does) and
    # return dk / dv with Hkv heads.
    native_varlen: ClassVar[bool] = True

    def varlen_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal, scale):
        q, k, v = (t.contiguous() for t in (q, k, v))  # packed rows may arrive as head-major views
        out, lse, *_ = _aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, is_causal, False, scale=scale
        )  # out (Tq, Hq, D), lse (Hq, Tq) fp32
        if lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(
                f"varlen flash attention returned lse of shape {tuple(lse.shape)}; expected (Hq, Tq) = "
                f"{(q.shape[1], q.shape[0])} (the layout of torch 2.13). Use CPSettings(piece_packing='per_piece')."
            )
        return out, lse.t()  # (Tq, Hq)

    def varlen_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, is_causal, scale):
        dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # read only with dropout
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = _aten._flash_attention_backward(
            dout, q, k, v, out, lse.t().contiguous(), cu_q, cu_k, max_q, max_k, 0.0, is_causal, rng_state,
            unused, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


@dataclass(frozen=True)
class CudaCudnnKernel(AttentionKernel):
    """cuDNN attention (``_scaled_dot_product_cudnn_attention``), fp16/bf16; its lse carries a trailing 1."""

    name: str = "cudnn"

    def forward(self, q, k, v, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep)
        out, lse, *_ = _aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )
        return out, lse.reshape(q.shape[:3])

    def backward(self, dout, q, k, v, out, lse, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep)
        # As for flash: undefined cum_seq_q/k select the dense (not nested) path.
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous().unsqueeze(-1), empty, empty, None,
            None, None, q.shape[2], k.shape[2], 0.0, is_causal, scale=scale,
        )  # fmt: skip
        return dq, _reduce_kv_heads(dk, n_rep), _reduce_kv_heads(dv, n_rep)


@dataclass(frozen=True)
class CudaEfficientKernel(AttentionKernel):
    """Memory-efficient attention (``_scaled_dot_product_efficient_attention``); its lse is padded to 32."""

    name: str = "efficient"

    def forward(self, q, k, v, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep)
        out, lse, *_ = _aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, is_causal, scale=scale
        )
        return out, lse[..., : q.shape[2]]

    def backward(self, dout, q, k, v, out, lse, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        k, v = _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep)
        sq = q.shape[2]
        padded = torch.zeros(*lse.shape[:2], math.ceil(sq / 32) * 32, dtype=torch.float32, device=lse.device)
        padded[..., :sq] = lse
        empty = torch.empty(0, device=q.device, dtype=torch.int64)
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout,
            q,
            k,
            v,
            None,
            out,
            padded,
            empty,
            empty,
            0.0,
            [True, True, True, False],
            is_causal,
            scale=scale,
        )
        return dq, _reduce_kv_heads(dk, n_rep), _reduce_kv_heads(dv, n_rep)


@dataclass(frozen=True)
class MathKernel(AttentionKernel):
    """Explicit softmax computed in fp32 (fp64 for fp64 inputs): any device and dtype; slow, for checks."""

    name: str = "math"

    @staticmethod
    def _scores(q, k, is_causal, scale):
        s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
        if is_causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~mask, float("-inf"))
        return s

    @staticmethod
    def _upcast(*xs: torch.Tensor) -> list[torch.Tensor]:
        acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
        return [x.to(acc) for x in xs]

    def forward(self, q, k, v, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        qf, kf, vf = self._upcast(q, _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep))
        s = self._scores(qf, kf, is_causal, scale)  # (B, Hq, Sq, Sk)
        lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Sq)
        out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vf)
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, *, is_causal, scale):
        n_rep = q.shape[1] // k.shape[1]
        qf, kf, vf, doutf, outf, lsef = self._upcast(
            q, _expand_kv_heads(k, n_rep), _expand_kv_heads(v, n_rep), dout, out, lse
        )
        p = torch.exp(self._scores(qf, kf, is_causal, scale) - lsef.unsqueeze(-1))  # (B, Hq, Sq, Sk)
        dv = torch.matmul(p.transpose(-1, -2), doutf)
        dp = torch.matmul(doutf, vf.transpose(-1, -2))
        delta = (doutf * outf).sum(dim=-1, keepdim=True)  # (B, Hq, Sq, 1)
        ds = p * (dp - delta)
        dq = torch.matmul(ds, kf) * scale
        dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
        dk, dv = _reduce_kv_heads(dk, n_rep), _reduce_kv_heads(dv, n_rep)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


KERNELS: dict[str, AttentionKernel] = {
    k.name: k
    for k in (CpuFlashKernel(), CudaFlashKernel(), CudaCudnnKernel(), CudaEfficientKernel(), MathKernel())
}


def select_kernel(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> AttentionKernel:
    """Pick the kernel adapter for ``device``/``dtype``, or the one named by ``backend``.

    Defaults: CPU -> ``cpu_flash``; CUDA fp16/bf16 -> ``flash``; CUDA fp32 -> ``efficient``;
    fp64 on CUDA -> ``math``.
    """
    if backend is not None:
        if backend not in KERNELS:
            raise ValueError(f"Unknown attention backend {backend!r}; expected one of {sorted(KERNELS)}.")
        kernel = KERNELS[backend]
        if device.type != "cuda" and kernel.name in ("flash", "cudnn", "efficient"):
            raise ValueError(f"Attention backend {backend!r} needs CUDA tensors, got device {device}.")
        if device.type == "cuda" and kernel.name == "cpu_flash":
            raise ValueError(f"Attention backend 'cpu_flash' needs CPU tensors, got device {device}.")
        return kernel
    if device.type == "cpu":
        return KERNELS["cpu_flash"]
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            return KERNELS["flash"]
        if dtype == torch.float32:
            return KERNELS["efficient"]
        return KERNELS["math"]
    return KERNELS["math"]
