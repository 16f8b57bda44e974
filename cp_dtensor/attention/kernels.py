"""Attention kernel adapters: one small class per backend with the same ``(out, lse)`` interface.

Every adapter computes, for one block of queries against one block of keys/values,

    forward(q, k, v)  -> out (B, Hq, Sq, D) in q's dtype,  lse (B, Hq, Sq) natural-log log-sum-exp
    backward(dout, q, k, v, out, lse) -> dq (B, Hq, Sq, D), dk, dv (B, Hkv, Sk, D)

where ``out`` and ``lse`` passed to ``backward`` may be the *merged* results of a whole ring: with the
global lse the kernel recomputes the global softmax probabilities restricted to this block, so the
per-block gradients add up exactly to the full-sequence gradients.

Only two mask shapes are ever requested by the ring: no mask, and the causal lower triangle on a square
block (Sq == Sk), so the difference between top-left and bottom-right causal alignment never matters.
``k``/``v`` carry Hkv heads (GQA/MQA); adapters whose kernel cannot take that shape expand the heads
locally, after communication, and sum the expanded gradients back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "KERNELS",
    "AttentionKernel",
    "CpuFlashKernel",
    "CudaCudnnKernel",
    "CudaEfficientKernel",
    "CudaFlashKernel",
    "MathKernel",
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


@dataclass(frozen=True)
class AttentionKernel:
    """Base class of the kernel adapters; subclasses implement :meth:`forward` and :meth:`backward`."""

    name: str = "base"

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
