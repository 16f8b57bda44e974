"""An analytic cost model that recommends parallel degrees (tp, cp, pp, dp) and activation checkpointing.

The model prices one training step of a decoder on ``n_gpus`` devices for every valid layout, keeps the
layouts whose memory fits, and ranks them by throughput. It is a planning aid: every formula is below,
every constant lives in :class:`Hardware` or :class:`CostOptions`, and ``scripts/plan.py`` compares its
predictions with measured step times and activation bytes (Note [Calibration file]).

Note [Cost model]
~~~~~~~~~~~~~~~~~
Notation: ``S`` global sequence length, ``b`` micro-batch (sequences), ``t, c, p, d`` the tp, cp, pp, dp
degrees, ``m`` micro-batches per step per DP replica, ``h`` model dim, ``a`` query heads, ``g`` KV heads,
``hd = h / a``, ``kv = g * hd``, ``f`` FFN hidden size, ``V`` vocab, ``L`` layers, ``Ls = L / p`` layers per
stage, ``B`` bytes of the compute dtype, ``Bg = 4`` bytes of fp32 gradients in communication,
``P`` peak dense FLOP/s, ``e_mm`` / ``e_at`` achievable fractions for matmuls / attention kernels, ``T = b*S/c``
tokens that one TP group holds (its CP shard).

Compute, per micro-batch, per device (the slowest pipeline stage, the one holding the output head)::

    W        = h*(h + 2*kv) + h*h + n_mlp*h*f        weights of one layer (n_mlp = 2 GELU, 3 SwiGLU)
    mm_fwd   = 2 * T * (Ls*W + h*V) / t               matmul FLOPs of the forward
    pairs    = S^2 / (2c)   causal, zigzag (exact: rank r holds chunks r and 2c-1-r, (S/2c)^2 * 2c pairs)
             = S^2 (2c-1) / (2c^2)   causal, contiguous (the last rank is the critical path)
             = S^2 / c      bidirectional
    at_fwd   = 4 * b * hd * (a/t) * pairs             QK^T and PV of one layer (causal = half of bidirectional)
    matmul   = 3 * mm_fwd + R * 2*T*W/t               backward = 2 forwards; R recomputed layers add one forward
    attn     = Ls * at_fwd * (1 + k_bwd) + R * at_fwd  flash backward k_bwd = 2.5 forwards (recomputes P)
    time     = matmul / (P e_mm) + attn / (P e_at) + (2 Ls + R) * layer_overhead

``R = Ls`` with full recompute (the "1/3 extra forward" of the matmuls), ``ceil(Ls / N)`` with selective
(layer-selective every N-th block, as ``cp_dtensor.parallelize.apply_ac``), 0 without.

Collectives: a ring collective of a tensor of ``size`` bytes over ``n`` ranks costs
``(n-1)/n * size / bw + (n-1) * latency``; a link is intra-node when the axis and every axis inside it
(mesh order pp, dp, cp, tp with tp innermost) fit in one node, inter-node otherwise.

* TP with sequence parallelism, per layer: forward all-gather before attention and MLP, reduce-scatter
  after them (4 collectives of ``T*h*B`` bytes), the same 4 in backward, 2 more in backward when the
  implementation re-gathers the sequence-sharded input of the column-parallel linears instead of saving the
  gathered one (Megatron), 4 more per recomputed layer (2 more with re-gather, which the recompute makes
  unnecessary); plus 3 for the embedding and the head, and an all-gather of the logits (``T*V*B``) when
  they are replicated over tp. Exposed: ``(1 - tp_overlap) * tp_comm``; default ``tp_overlap = 0`` - the
  seed's point: a big TP makes each linear too short to hide its collective.
* CP ring (p2p), per layer, per rank: ``c-1`` steps, each sends the local K,V of the local KV heads
  ``msg_f = 2 * T * (g/t) * hd * B`` forward; backward sends K,V again plus the fp32 dK,dV accumulators,
  ``msg_b = 2 * T * (g/t) * hd * (B + 4)``. Only the KV heads travel (GQA/MQA shrink the messages).
  Each transfer overlaps the attention block of the previous ring step::

      exposed_f = (c-1) * max(0, msg_f/bw + lat - at_fwd/(P e_at)/c)      (backward: msg_b, k_bwd * at_fwd)

* PP: 1F1B, ``step = (m + p - 1) * t_mb``, bubble fraction ``(p-1)/(m+p-1)``; each micro-batch also sends
  its activation ``T*h*B/t`` forward and its gradient backward to the next stage (not overlapped).
* FSDP over dp x cp (``n = d*c``): per micro-batch an all-gather of the stage's bf16 parameters in forward
  and again in backward (reshard after forward); once per step a reduce-scatter of fp32 gradients
  (``set_requires_gradient_sync(False)`` on all but the last micro-batch; ``grad_sync_every_microbatch``
  prices FSDP2's default of one per micro-batch).
  Prefetching hides it behind compute: ``exposed = max(0, fsdp_comm - compute) + first/last layer``.

What overlaps with what (one layer, one micro-batch, one rank, forward; backward is the mirror)::

    compute  |norm|...|wq wk wv|blk0|blk1|blk2|blk3|...|wo|norm|...|w1 w3 w2|...
    TP comm  |    |AG |        |    |    |    |    |   |  |RS  |AG |        |RS|   serial (tp_overlap = 0)
    CP comm  |             KV1 -> KV2 -> KV3 ->                                   under blk0..blk2
    FSDP     |<---- all-gather params of layer l+1, reduce-scatter grads of layer l+1 ---->|  under compute
    step     = (m + p - 1) * t_mb + fsdp_exposed,  t_mb = compute + TP + CP exposed + PP p2p

Activation memory per device (bytes saved for backward when the forward ends), per token of the CP shard
and per layer, in the standard accounting of Korthikanti et al. (``34*h + 5*a*s`` bytes for GPT in bf16
with dropout), adapted to flash attention (no ``a*s^2`` softmax term; instead the fp32 ``lse``)::

    seq-sharded over tp (SP):  2 norms: B*h each fused; unfused fp32 norms keep 8h + 4 (+ B*h cast if B < 4)
                               + 2 dropout masks (h bytes each, only if the model has dropout)
    gathered inputs:           2 * h * B (QKV input, MLP input); divided by t only when the
                               implementation saves the SP shard and re-gathers (Megatron)
    head-sharded (/t):         q, k, v (h + 2kv)*B (after RoPE), attention out h*B (also wo's input),
                               lse 4*a, MLP 2f*B (GELU) or 4f*B (SwiGLU)
    per token, once:           token ids (8 bytes) and the fp32 RoPE table (4*hd)
    GPT-175B, Megatron, bf16:  (4h + 2h) + 4h + (6h + 2h + 16h) = 34h bytes  (+ 4a/t for lse)

The total per device is ``T * (Ls * layer + head)`` with ``layer`` divided by ``t`` as above, i.e. it
scales as ``1/(t*c)`` (up to the gathered inputs when they are saved unsharded). Full recompute keeps only
each block's input (``h*B/t``) plus, during backward, one block's full activations; selective keeps the
input for every N-th block and everything for the rest. The output head keeps the gathered final norm
output and fp32 log-softmax of ``V/t`` (vocab-parallel loss) or ``V`` (logits replicated over tp). With PP
(1F1B) the first stage holds ``min(p, m)`` micro-batches in flight. With ``CostOptions.cp_dtensor()`` and
fp32, this matches the bytes autograd saves for this project's Llama (none, full, selective) to 12 bytes.

State: FSDP2 with fp32 master weights: ``16`` bytes per parameter (4 param + 4 grad + 8 Adam) of the
stage's tp shard, divided by ``d*c``; while a layer runs, its unsharded bf16 parameters and gradients
(``B + 4`` bytes each, two layers with prefetch). A layout fits when
``state + transient + activations + recompute working set <= memory * usable_fraction``.

Assumptions and simplifications: matmul efficiency does not depend on the shape; norms, RoPE and other
elementwise kernels cost no time (``layer_overhead_s`` absorbs fixed costs); collectives of different axes
do not contend for links; the CP ring and FSDP run on separate streams; every GPU has its own inter-node
NIC; Megatron's attention-only selective recompute is not modelled because flash attention already stores
no ``s^2`` tensors (recomputing it would save only the lse), so "selective" is layer-selective.

Note [Calibration file]
~~~~~~~~~~~~~~~~~~~~~~~
A JSON object; every key but ``measurements`` is optional::

    {
      "model": "small",                         # ModelShape name (see build_model_shape)
      "seq_len": 4096, "micro_batch": 1,        # defaults for the rows
      "hardware": {"peak_flops": 4e10, ...},    # overrides of Hardware fields
      "options": {"dtype_bytes": 4, ...},       # overrides of CostOptions fields
      "measurements": [
        {"layout": {"tp": 4, "cp": 1, "pp": 1, "dp": 1, "ac": "full"},   # or "tp4+full"
         "step_time_s": 1.25, "activation_bytes": 123456789,   # either may be null / missing
         "seq_len": 4096, "micro_batch": 1, "microbatches": 1}  # optional per-row overrides
      ]
    }

``activation_bytes`` is the bytes of distinct storages autograd saves in forward + loss on the largest
rank, *parameters excluded*. Note that ``F.linear`` saves ``weight.t()``, a view that is not an
``nn.Parameter``: a counter that skips only ``nn.Parameter`` instances also counts every weight once;
:func:`cp_dtensor.memory.count_saved_tensors` skips parameters and their views. The prediction includes the
fp32 log-softmax of the loss. :func:`compare_measurements` reports ``(predicted - measured) / measured``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from cp_dtensor.models.llama import LLAMA3_FLAVORS, ModelArgs

__all__ = [
    "GIB",
    "GPT_175B",
    "HARDWARE_PRESETS",
    "Calibration",
    "Comparison",
    "CostOptions",
    "Estimate",
    "Hardware",
    "Layout",
    "Measurement",
    "ModelShape",
    "Recommendation",
    "activation_bytes_per_token_layer",
    "attention_flops",
    "build_hardware",
    "build_model_shape",
    "compare_measurements",
    "cp_comm_bytes",
    "enumerate_layouts",
    "estimate",
    "load_calibration",
    "model_flops_per_token",
    "pp_bubble_fraction",
    "recommend",
    "validate_layout",
]

ACMode = Literal["none", "selective", "full"]
AC_MODES: tuple[str, ...] = ("none", "selective", "full")
SELECTIVE_EVERY_CHOICES: tuple[int, ...] = (8, 6, 4, 3, 2)
GIB = float(2**30)


# --------------------------------------------------------------------------------------------------------
# Inputs: model, hardware, options, layout
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder, as the cost model needs it.

    Attributes:
        name: A label for tables.
        dim: Hidden size ``h``.
        n_layers: Number of transformer blocks ``L``.
        n_heads: Query heads ``a``.
        n_kv_heads: Key/value heads ``g`` (``a`` for MHA, 1 for MQA).
        ffn_hidden: Hidden size ``f`` of the MLP.
        vocab_size: ``V``.
        mlp: ``"swiglu"`` (3 matrices, Llama) or ``"gelu"`` (2 matrices, GPT).
        tied_embeddings: The output head shares the embedding matrix (counted once in the parameters).
        dropout: Hidden dropout after attention and MLP (its masks are stored for backward).
        causal: Causal (decoder) attention; False for bidirectional.
    """

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    tied_embeddings: bool = False
    dropout: bool = False
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelShape.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelShape.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"ModelShape.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")

    @property
    def head_dim(self) -> int:
        """``hd = h / a``."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """``kv = g * hd``: width of K (and of V)."""
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of the MLP: 3 for SwiGLU, 2 for GELU."""
        return 3 if self.mlp == "swiglu" else 2

    @property
    def layer_matmul_params(self) -> int:
        """``W``: weights of one block that take part in matmuls (wq, wk, wv, wo and the MLP)."""
        h = self.dim
        return h * (h + 2 * self.kv_dim) + h * h + self.mlp_matrices * h * self.ffn_hidden

    @property
    def layer_params(self) -> int:
        """Parameters of one block: matmul weights plus the two norm weights."""
        return self.layer_matmul_params + 2 * self.dim

    @property
    def head_params(self) -> int:
        """Output projection ``h * V`` (also used as the matmul size when embeddings are tied)."""
        return self.dim * self.vocab_size

    @property
    def embedding_params(self) -> int:
        """Embedding table parameters not shared with the head (0 when tied)."""
        return 0 if self.tied_embeddings else self.dim * self.vocab_size

    @property
    def params(self) -> int:
        """All parameters (blocks, final norm, head, untied embedding)."""
        return self.n_layers * self.layer_params + self.dim + self.head_params + self.embedding_params

    @classmethod
    def from_model_args(cls, args: ModelArgs, name: str = "llama") -> ModelShape:
        """The shape of a ``cp_dtensor.models.llama`` model (SwiGLU, untied, no dropout).

        Args:
            args: Model arguments, e.g. ``LLAMA3_FLAVORS["8B"]``.
            name: Label for tables.

        Returns:
            The shape.
        """
        return cls(
            name=name,
            dim=args.dim,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            n_kv_heads=args.kv_heads,
            ffn_hidden=args.ffn_hidden_dim,
            vocab_size=args.vocab_size,
            mlp="swiglu",
            tied_embeddings=False,
            dropout=False,
            causal=args.causal,
        )

    @classmethod
    def from_flavor(cls, flavor: str) -> ModelShape:
        """The shape of ``LLAMA3_FLAVORS[flavor]`` (e.g. ``"debug"``, ``"small"``, ``"8B"``, ``"70B"``)."""
        if flavor not in LLAMA3_FLAVORS:
            raise ValueError(f"Unknown Llama flavor {flavor!r}; choose from {sorted(LLAMA3_FLAVORS)}")
        return cls.from_model_args(LLAMA3_FLAVORS[flavor], name=f"llama3_{flavor}")


# The seed's model (Figure 2): GPT-3 175B, MHA, GELU MLP 4h, tied embeddings, hidden dropout.
GPT_175B = ModelShape(
    name="gpt175b",
    dim=12288,
    n_layers=96,
    n_heads=96,
    n_kv_heads=96,
    ffn_hidden=4 * 12288,
    vocab_size=51200,
    mlp="gelu",
    tied_embeddings=True,
    dropout=True,
)


def build_model_shape(name: str) -> ModelShape:
    """A model by name: ``gpt175b``, ``llama3_<flavor>`` (``llama3_8b``, ``llama3_70b``) or a raw flavor.

    Args:
        name: Case-insensitive model name; Llama flavors are looked up in ``LLAMA3_FLAVORS``.

    Returns:
        The shape.
    """
    key = name.strip()
    if key.lower() in ("gpt175b", "gpt-175b", "gpt3_175b"):
        return GPT_175B
    flavor = key[len("llama3_") :] if key.lower().startswith("llama3_") else key
    by_lower = {k.lower(): k for k in LLAMA3_FLAVORS}
    if flavor.lower() not in by_lower:
        choices = ["gpt175b", *(f"llama3_{k.lower()}" for k in LLAMA3_FLAVORS), *LLAMA3_FLAVORS]
        raise ValueError(f"Unknown model {name!r}; choose from {choices}")
    return ModelShape.from_flavor(by_lower[flavor.lower()])


@dataclass(frozen=True)
class Hardware:
    """One device type and its interconnect.

    Attributes:
        name: Label for tables.
        memory_bytes: Device memory.
        peak_flops: Peak dense FLOP/s of one device in the compute dtype (bf16 on GPUs).
        matmul_efficiency: Achievable fraction of ``peak_flops`` for the linear layers (MFU-like).
        attention_efficiency: Achievable fraction of ``peak_flops`` for the attention kernels.
        intra_node_bandwidth: Bytes/s per direction per device within a node (NVLink).
        inter_node_bandwidth: Bytes/s per direction per device between nodes (one NIC per GPU).
        devices_per_node: Devices that share the intra-node link.
        intra_node_latency_s: Latency of one intra-node message.
        inter_node_latency_s: Latency of one inter-node message.
        memory_usable_fraction: Part of ``memory_bytes`` available to tensors (allocator, runtime, buffers).
        layer_overhead_s: Fixed time per block per pass (forward, backward, recompute): launch and Python
            overhead; 0 on GPUs, the dominant term for tiny models on CPU.
    """

    name: str
    memory_bytes: float
    peak_flops: float
    matmul_efficiency: float
    attention_efficiency: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    devices_per_node: int
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 1e-5
    memory_usable_fraction: float = 0.9
    layer_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "peak_flops", "intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Hardware.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("matmul_efficiency", "attention_efficiency", "memory_usable_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Hardware.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ValueError(f"Hardware.devices_per_node must be an int >= 1, got {self.devices_per_node!r}")
        for name in ("intra_node_latency_s", "inter_node_latency_s", "layer_overhead_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"Hardware.{name} must be >= 0, got {getattr(self, name)!r}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> Hardware:
        """A copy with some fields replaced; unknown keys raise ``ValueError`` naming the valid ones."""
        return _replace_checked(self, overrides)

    def link(self, span: int) -> tuple[float, float]:
        """``(bandwidth, latency)`` of a group whose ranks span ``span`` consecutive devices."""
        if span <= self.devices_per_node:
            return self.intra_node_bandwidth, self.intra_node_latency_s
        return self.inter_node_bandwidth, self.inter_node_latency_s


HARDWARE_PRESETS: dict[str, Hardware] = {
    # H100 SXM (80 GiB; nvidia-smi shows 81559 MiB): 989 TFLOP/s dense bf16, NVLink4 450 GB/s per
    # direction, one 400 Gb/s NDR NIC (50 GB/s) per GPU.
    "h100": Hardware(
        name="h100",
        memory_bytes=80 * GIB,
        peak_flops=989e12,
        matmul_efficiency=0.6,
        attention_efficiency=0.45,
        intra_node_bandwidth=450e9,
        inter_node_bandwidth=50e9,
        devices_per_node=8,
    ),
    # A100 SXM 80 GB: 312 TFLOP/s bf16, NVLink3 300 GB/s per direction, 200 Gb/s HDR per GPU.
    "a100": Hardware(
        name="a100",
        memory_bytes=80 * GIB,
        peak_flops=312e12,
        matmul_efficiency=0.6,
        attention_efficiency=0.45,
        intra_node_bandwidth=300e9,
        inter_node_bandwidth=25e9,
        devices_per_node=8,
        inter_node_latency_s=1.5e-5,
    ),
    # A CPU "device" is one gloo rank of a local run. Measured here (torch 2.13 CPU, one thread): fp32
    # matmul ~80 GFLOP/s, SDPA flash forward ~47 GFLOP/s. The preset is a rank of 4 ranks sharing 2 cores
    # (half a core each: 50 GFLOP/s "peak"); loopback gloo. Rough; calibrate with --calibrate-from.
    "cpu": Hardware(
        name="cpu",
        memory_bytes=8 * GIB,
        peak_flops=5e10,
        matmul_efficiency=0.8,
        attention_efficiency=0.45,
        intra_node_bandwidth=1e9,
        inter_node_bandwidth=1e9,
        devices_per_node=64,
        intra_node_latency_s=1e-4,
        inter_node_latency_s=1e-4,
        memory_usable_fraction=0.8,
        layer_overhead_s=2e-3,
    ),
}
# H200: the H100's compute and links with 141 GB of HBM3e (140 GiB counted).
HARDWARE_PRESETS["h200"] = replace(HARDWARE_PRESETS["h100"], name="h200", memory_bytes=140 * GIB)


def build_hardware(name: str, overrides: Mapping[str, Any] | None = None) -> Hardware:
    """A preset from ``HARDWARE_PRESETS`` (``h100``, ``h200``, ``a100``, ``cpu``), optionally overridden."""
    if name.lower() not in HARDWARE_PRESETS:
        raise ValueError(f"Unknown hardware {name!r}; choose from {sorted(HARDWARE_PRESETS)}")
    hw = HARDWARE_PRESETS[name.lower()]
    return hw.with_overrides(overrides) if overrides else hw


@dataclass(frozen=True)
class CostOptions:
    """Implementation choices and numeric formats the estimate depends on.

    Attributes:
        dtype_bytes: Bytes of parameters/activations in compute (2 for bf16, 4 for fp32 on CPU).
        grad_comm_bytes: Bytes per element of FSDP gradient reduce-scatter (fp32).
        cp_grad_bytes: Bytes per element of the dK/dV accumulators in the CP ring backward (fp32).
        state_bytes_per_param: Sharded bytes per parameter: fp32 master (4) + fp32 grad (4) + Adam (8).
        tp_overlap: Fraction of TP communication hidden behind compute (0: none, the seed's premise).
        cp_overlap: The CP ring overlaps each KV transfer with the previous block's attention.
        cp_layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"`` (last rank does the most).
        attention_backward_factor: Attention backward FLOPs in forwards (flash: 2.5, it recomputes P).
        fsdp_reshard_after_forward: FSDP all-gathers parameters again in backward.
        grad_sync_every_microbatch: FSDP reduce-scatters gradients after every micro-batch (else once).
        saves_gathered_input: The column-parallel linears save their all-gathered (full over tp) input, as
            DTensor TP does; False: the SP shard is saved and re-gathered in backward (Megatron).
        fused_norm: Norms keep only their input; False: the unfused fp32 norm keeps its fp32 input, the
            normalized fp32 output and (when the dtype is narrower) its cast.
        loss_parallel: Vocab-parallel cross entropy (logits stay sharded over tp); False: logits are
            all-gathered to full vocab on every tp rank.
    """

    dtype_bytes: int = 2
    grad_comm_bytes: int = 4
    cp_grad_bytes: int = 4
    state_bytes_per_param: float = 16.0
    tp_overlap: float = 0.0
    cp_overlap: bool = True
    cp_layout: Literal["zigzag", "contiguous"] = "zigzag"
    attention_backward_factor: float = 2.5
    fsdp_reshard_after_forward: bool = True
    grad_sync_every_microbatch: bool = False
    saves_gathered_input: bool = False
    fused_norm: bool = True
    loss_parallel: bool = True

    def __post_init__(self) -> None:
        if self.dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(f"CostOptions.dtype_bytes must be 1, 2, 4 or 8, got {self.dtype_bytes!r}")
        if not 0 <= self.tp_overlap <= 1:
            raise ValueError(f"CostOptions.tp_overlap must be in [0, 1], got {self.tp_overlap!r}")
        if self.cp_layout not in ("zigzag", "contiguous"):
            raise ValueError(
                f"CostOptions.cp_layout must be 'zigzag' or 'contiguous', got {self.cp_layout!r}"
            )
        if self.attention_backward_factor <= 0:
            raise ValueError(
                f"CostOptions.attention_backward_factor must be > 0, got {self.attention_backward_factor!r}"
            )

    @classmethod
    def megatron(cls, **overrides: Any) -> CostOptions:
        """Megatron-Core / Transformer Engine on GPUs: fused kernels, SP re-gather, vocab-parallel loss."""
        return replace(cls(), **overrides)

    @classmethod
    def cp_dtensor(cls, **overrides: Any) -> CostOptions:
        """This project as written (DTensor TP saves gathered inputs, unfused norms, logits replicated over tp).

        Its RoPE multiplies by cos/sin tables that need no gradient, so autograd keeps no pre-rotation q, k;
        the SDPA output is already laid out (B, S, H, D), so ``transpose(1, 2).contiguous()`` before ``wo``
        copies nothing. Checked against the saved tensors of the real model in tests/test_planner.py.
        """
        base = cls(saves_gathered_input=True, fused_norm=False, loss_parallel=False)
        return replace(base, **overrides)

    def with_overrides(self, overrides: Mapping[str, Any]) -> CostOptions:
        """A copy with some fields replaced; unknown keys raise ``ValueError`` naming the valid ones."""
        return _replace_checked(self, overrides)


def _replace_checked(obj: Any, overrides: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown {type(obj).__name__} fields {unknown}; valid fields are {sorted(names)}")
    return replace(obj, **dict(overrides))


@dataclass(frozen=True)
class Layout:
    """One candidate: degrees (world size = tp * cp * pp * dp) and activation checkpointing.

    Attributes:
        tp: Tensor (and sequence) parallel degree.
        cp: Context parallel degree.
        pp: Pipeline stages.
        dp: Data parallel replicas (FSDP shards over dp x cp).
        ac: ``"none"``, ``"selective"`` (every ``selective_every``-th block) or ``"full"``.
        selective_every: With ``"selective"``, recompute every N-th block.
    """

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    ac: str = "none"
    selective_every: int = 2

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp", "dp", "selective_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{name} must be an int >= 1, got {value!r}")
        if self.ac not in AC_MODES:
            raise ValueError(f"Layout.ac must be one of {AC_MODES}, got {self.ac!r}")

    @property
    def world_size(self) -> int:
        """``tp * cp * pp * dp``."""
        return self.tp * self.cp * self.pp * self.dp

    @property
    def ac_label(self) -> str:
        """``none``, ``full`` or ``sel/N``."""
        return f"sel/{self.selective_every}" if self.ac == "selective" else self.ac

    @property
    def label(self) -> str:
        """Compact label, e.g. ``TP8 CP2 PP1 DP4 none``."""
        return f"TP{self.tp} CP{self.cp} PP{self.pp} DP{self.dp} {self.ac_label}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form (as in Note [Calibration file])."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], world_size: int | None = None) -> Layout:
        """From ``{"tp": .., "cp": .., "pp": .., "dp": .., "ac": ..}``; a missing dp is inferred."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Unknown layout keys {unknown}; expected tp, cp, pp, dp, ac, selective_every")
        kw = {k: data[k] for k in data}
        if "dp" not in kw and world_size is not None:
            kw["dp"] = _infer_dp(world_size, kw.get("tp", 1), kw.get("cp", 1), kw.get("pp", 1))
        return cls(**kw)

    @classmethod
    def parse(cls, text: str, world_size: int | None = None) -> Layout:
        """Parse ``"tp4+full"``, ``"tp2cp2"``, ``"cp4"``, ``"tp8cp2pp2dp2+selective/4"``.

        Missing degrees are 1, except dp, which is inferred from ``world_size`` when given.
        """
        m = re.fullmatch(
            r"((?:(?:tp|cp|pp|dp)\d+)+)(?:\+(none|full|selective|sel)(?:/(\d+))?)?", text.lower()
        )
        if m is None:
            raise ValueError(
                f"Cannot parse layout {text!r}; write degrees then an optional AC mode, e.g. "
                f"'tp4+full', 'tp2cp2', 'tp8cp2pp2dp2+selective/4'"
            )
        degrees = {k: int(v) for k, v in re.findall(r"(tp|cp|pp|dp)(\d+)", m.group(1))}
        ac = {"sel": "selective"}.get(m.group(2) or "none", m.group(2) or "none")
        every = int(m.group(3)) if m.group(3) else 2
        if "dp" not in degrees:
            degrees["dp"] = (
                _infer_dp(world_size, degrees.get("tp", 1), degrees.get("cp", 1), degrees.get("pp", 1))
                if world_size is not None
                else 1
            )
        return cls(**degrees, ac=ac, selective_every=every)


def _infer_dp(world_size: int, tp: int, cp: int, pp: int) -> int:
    others = tp * cp * pp
    if world_size % others:
        raise ValueError(f"world size {world_size} is not divisible by tp * cp * pp = {others}")
    return world_size // others


# --------------------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------------------


def attention_pairs(seq_len: int, cp: int = 1, *, causal: bool = True, cp_layout: str = "zigzag") -> float:
    """Query-key pairs the busiest CP rank computes for one sequence (all heads count once).

    Args:
        seq_len: Global sequence length ``S``.
        cp: CP degree.
        causal: Causal mask (lower triangle, ``S^2/2`` pairs in total) or bidirectional (``S^2``).
        cp_layout: ``"zigzag"``: every rank does exactly ``1/cp`` of the work; ``"contiguous"``: the last
            rank does ``(2cp-1)/(2cp^2) S^2``.

    Returns:
        Pairs on the critical path.
    """
    s2 = float(seq_len) ** 2
    if not causal:
        return s2 / cp
    if cp_layout == "zigzag" or cp == 1:
        return s2 / (2 * cp)
    return s2 * (2 * cp - 1) / (2 * cp * cp)


def attention_flops(
    model: ModelShape,
    seq_len: int,
    *,
    cp: int = 1,
    tp: int = 1,
    micro_batch: int = 1,
    causal: bool | None = None,
    cp_layout: str = "zigzag",
) -> float:
    """Forward FLOPs of ``QK^T`` and ``PV`` of one layer on the busiest rank: ``4 * b * hd * a/tp * pairs``."""
    is_causal = model.causal if causal is None else causal
    pairs = attention_pairs(seq_len, cp, causal=is_causal, cp_layout=cp_layout)
    return 4.0 * micro_batch * model.head_dim * (model.n_heads / tp) * pairs


def model_flops_per_token(model: ModelShape, seq_len: int) -> float:
    """Useful training FLOPs per token for MFU: ``6 * matmul weights + 0.5 * 12 * L * h * S`` (causal)."""
    matmul = model.n_layers * model.layer_matmul_params + model.head_params
    attention = 12.0 * model.n_layers * model.dim * seq_len * (0.5 if model.causal else 1.0)
    return 6.0 * matmul + attention


def kv_heads_per_rank(model: ModelShape, tp: int) -> int:
    """KV heads each TP rank holds (replicated when there are fewer KV heads than tp ranks)."""
    return max(1, model.n_kv_heads // tp)


def cp_comm_bytes(
    model: ModelShape,
    seq_len: int,
    cp: int,
    *,
    tp: int = 1,
    micro_batch: int = 1,
    dtype_bytes: int = 2,
    grad_bytes: int = 4,
) -> tuple[float, float]:
    """Bytes one rank sends in the CP ring for one layer: ``(forward, backward)``.

    Forward: ``(cp-1) * 2 * b*S/cp * g/tp * hd * B`` (K and V of the KV heads only). Backward: K, V again
    plus the dK, dV accumulators in ``grad_bytes``: ``(cp-1) * 2 * b*S/cp * g/tp * hd * (B + Bg)``.
    """
    if cp == 1:
        return 0.0, 0.0
    elems = 2.0 * micro_batch * seq_len / cp * kv_heads_per_rank(model, tp) * model.head_dim
    return (cp - 1) * elems * dtype_bytes, (cp - 1) * elems * (dtype_bytes + grad_bytes)


def pp_bubble_fraction(pp: int, microbatches: int) -> float:
    """Idle fraction of a 1F1B (or GPipe) step: ``(pp - 1) / (microbatches + pp - 1)``."""
    if pp < 1 or microbatches < 1:
        raise ValueError(f"pp and microbatches must be >= 1, got pp={pp}, microbatches={microbatches}")
    return (pp - 1) / (microbatches + pp - 1)


def collective_time(size_bytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-gather or reduce-scatter of a ``size_bytes`` tensor over ``n`` ranks."""
    if n <= 1 or size_bytes <= 0:
        return 0.0
    return (n - 1) / n * size_bytes / bandwidth + (n - 1) * latency


def _norm_bytes(model: ModelShape, options: CostOptions) -> float:
    """Bytes per token one norm keeps for backward."""
    h, b = model.dim, options.dtype_bytes
    if options.fused_norm:
        return float(b * h)
    # unfused fp32 norm: fp32 input (a copy when B < 4), fp32 normalized output, its cast when B < 4, and
    # the fp32 reciprocal RMS (one value per token)
    return float((8 + (b if b < 4 else 0)) * h + 4)


def activation_bytes_per_token_layer(
    model: ModelShape, tp: int = 1, options: CostOptions | None = None
) -> float:
    """Bytes one block keeps for backward per token of the CP shard, on one TP rank (no checkpointing).

    See Note [Cost model]: sequence-sharded terms and head-sharded terms divide by ``tp``; the gathered
    inputs of the column-parallel linears divide by ``tp`` only when they are re-gathered in backward.
    """
    opt = options or CostOptions()
    h, b, kv = model.dim, opt.dtype_bytes, model.kv_dim
    seq_sharded = 2 * _norm_bytes(model, opt) + (2 * h if model.dropout else 0)
    gathered = 2 * h * b
    head_sharded = (h + 2 * kv) * b + h * b + 4 * model.n_heads
    head_sharded += (4 if model.mlp == "swiglu" else 2) * model.ffn_hidden * b
    return seq_sharded / tp + (gathered if opt.saves_gathered_input else gathered / tp) + head_sharded / tp


def _head_activation_bytes_per_token(model: ModelShape, tp: int, options: CostOptions) -> float:
    """Final norm, gathered head input and fp32 log-softmax per token (last stage)."""
    h, b = model.dim, options.dtype_bytes
    norm = _norm_bytes(model, options) / tp
    gathered = h * b if options.saves_gathered_input else h * b / tp
    vocab = model.vocab_size / tp if options.loss_parallel else model.vocab_size
    return norm + gathered + 4.0 * vocab


# --------------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """One layout priced for one step (times in seconds on the slowest device, memory in bytes).

    Attributes:
        layout: The candidate.
        seq_len: Global sequence length.
        micro_batch: Sequences per micro-batch.
        microbatches: Micro-batches per step per DP replica.
        tokens_per_step: ``dp * microbatches * micro_batch * seq_len``.
        step_time_s: Estimated step time.
        tokens_per_s: Global throughput.
        tokens_per_s_per_device: Throughput per device.
        mfu: Model FLOPs utilization (``model_flops_per_token``).
        matmul_s: Matmul compute incl. recompute.
        attention_s: Attention compute incl. recompute.
        recompute_s: The part of ``matmul_s + attention_s`` spent on recomputation.
        overhead_s: Fixed per-layer costs.
        tp_comm_s: TP collectives (total).
        tp_exposed_s: Their exposed part.
        cp_comm_s: CP ring transfers (total).
        cp_exposed_s: Their part not hidden behind attention.
        pp_comm_s: Stage-to-stage transfers.
        pp_bubble_s: Pipeline idle time.
        fsdp_comm_s: FSDP all-gathers and reduce-scatters (total).
        fsdp_exposed_s: Their part not hidden behind compute.
        activation_bytes: Saved for backward at the end of the forward (the busiest stage).
        working_bytes: Extra activations live during backward (one recomputed block).
        state_bytes: Sharded parameters, gradients and optimizer state.
        transient_bytes: Unsharded parameters/gradients of the blocks in flight (FSDP).
        peak_bytes: ``activation + working + state + transient``.
        memory_limit_bytes: ``memory_bytes * memory_usable_fraction``.
        fits: ``peak_bytes <= memory_limit_bytes`` and the layout is valid.
        reason: Why the layout is invalid or does not fit ("" when it fits).
    """

    layout: Layout
    seq_len: int
    micro_batch: int
    microbatches: int
    tokens_per_step: int = 0
    step_time_s: float = math.inf
    tokens_per_s: float = 0.0
    tokens_per_s_per_device: float = 0.0
    mfu: float = 0.0
    matmul_s: float = 0.0
    attention_s: float = 0.0
    recompute_s: float = 0.0
    overhead_s: float = 0.0
    tp_comm_s: float = 0.0
    tp_exposed_s: float = 0.0
    cp_comm_s: float = 0.0
    cp_exposed_s: float = 0.0
    pp_comm_s: float = 0.0
    pp_bubble_s: float = 0.0
    fsdp_comm_s: float = 0.0
    fsdp_exposed_s: float = 0.0
    activation_bytes: float = 0.0
    working_bytes: float = 0.0
    state_bytes: float = 0.0
    transient_bytes: float = 0.0
    peak_bytes: float = 0.0
    memory_limit_bytes: float = 0.0
    fits: bool = False
    reason: str = ""

    @property
    def compute_s(self) -> float:
        """Matmul + attention + overhead time."""
        return self.matmul_s + self.attention_s + self.overhead_s


def validate_layout(model: ModelShape, layout: Layout, seq_len: int, cp_layout: str = "zigzag") -> str:
    """Why ``layout`` cannot run ``model`` at ``seq_len`` ("" when it can).

    Rules (as ``cp_dtensor.parallelize`` and ``ParallelDims`` enforce them): tp divides the query and KV
    heads, the FFN and the vocab; seq_len is a multiple of ``tp * cp * 2`` (zigzag; ``tp * cp`` for
    contiguous, ``tp`` without CP); pp divides the layers.
    """
    t, c, p = layout.tp, layout.cp, layout.pp
    if model.n_heads % t or model.n_kv_heads % t:
        return f"tp {t} must divide n_heads {model.n_heads} and n_kv_heads {model.n_kv_heads}"
    if model.ffn_hidden % t or model.dim % t:
        return f"tp {t} must divide dim {model.dim} and ffn_hidden {model.ffn_hidden}"
    divisor = t * c * (2 if c > 1 and cp_layout == "zigzag" else 1)
    if seq_len % divisor:
        return f"seq_len {seq_len} must be a multiple of {divisor} (tp x cp x chunks)"
    if model.n_layers % p:
        return f"pp {p} must divide n_layers {model.n_layers}"
    if layout.ac == "selective" and layout.selective_every > model.n_layers // p:
        return f"selective_every {layout.selective_every} exceeds layers per stage {model.n_layers // p}"
    return ""


def estimate(
    model: ModelShape,
    layout: Layout,
    seq_len: int,
    hardware: Hardware,
    options: CostOptions | None = None,
    *,
    micro_batch: int = 1,
    microbatches: int = 1,
) -> Estimate:
    """Price one training step of ``layout`` (Note [Cost model]).

    Args:
        model: Model shape.
        layout: Degrees and activation checkpointing.
        seq_len: Global sequence length.
        hardware: Device and links.
        options: Implementation choices (default: :meth:`CostOptions.megatron`).
        micro_batch: Sequences per micro-batch.
        microbatches: Micro-batches per step per DP replica (gradient accumulation / pipeline).

    Returns:
        The estimate; ``fits`` is False (with a ``reason``) when the layout is invalid or out of memory.
    """
    opt = options or CostOptions()
    if micro_batch < 1 or microbatches < 1:
        raise ValueError(f"micro_batch and microbatches must be >= 1, got {micro_batch}, {microbatches}")
    est = Estimate(layout=layout, seq_len=seq_len, micro_batch=micro_batch, microbatches=microbatches)
    est.memory_limit_bytes = hardware.memory_bytes * hardware.memory_usable_fraction
    invalid = validate_layout(model, layout, seq_len, opt.cp_layout)
    if invalid:
        est.reason = invalid
        return est

    t, c, p, d, m, b = layout.tp, layout.cp, layout.pp, layout.dp, microbatches, micro_batch
    h, B, Bg = model.dim, opt.dtype_bytes, opt.grad_comm_bytes
    ls = model.n_layers // p
    tokens = b * seq_len / c  # T: tokens of this TP group's CP shard
    recomputed = {"none": 0, "full": ls, "selective": math.ceil(ls / layout.selective_every)}[layout.ac]
    flops_rate_mm = hardware.peak_flops * hardware.matmul_efficiency
    flops_rate_at = hardware.peak_flops * hardware.attention_efficiency

    # ---- compute (per micro-batch, last stage: layers + head) -------------------------------------------
    mm_layer_fwd = 2.0 * tokens * model.layer_matmul_params / t / flops_rate_mm
    mm_head_fwd = 2.0 * tokens * model.head_params / t / flops_rate_mm
    at_layer_fwd = (
        attention_flops(model, seq_len, cp=c, tp=t, micro_batch=b, cp_layout=opt.cp_layout) / flops_rate_at
    )
    k_bwd = opt.attention_backward_factor
    matmul = 3 * (ls * mm_layer_fwd + mm_head_fwd) + recomputed * mm_layer_fwd
    attention = ls * at_layer_fwd * (1 + k_bwd) + recomputed * at_layer_fwd
    recompute = recomputed * (mm_layer_fwd + at_layer_fwd)
    overhead = (2 * ls + recomputed) * hardware.layer_overhead_s

    # ---- TP (sequence parallel) ---------------------------------------------------------------------
    tp_bw, tp_lat = hardware.link(t)
    act_msg = tokens * h * B
    one = collective_time(act_msg, t, tp_bw, tp_lat)
    regather = 0 if opt.saves_gathered_input else 2
    per_layer = 8 + regather
    n_coll = ls * per_layer + recomputed * (4 - regather)  # a recomputed block re-gathers in its forward
    tp_comm = n_coll * one + 3 * one  # + embedding RS, head AG (fwd) and RS (bwd)
    if not opt.loss_parallel:
        tp_comm += collective_time(tokens * model.vocab_size * B, t, tp_bw, tp_lat)
    tp_exposed = (1.0 - opt.tp_overlap) * tp_comm

    # ---- CP ring -------------------------------------------------------------------------------------
    cp_comm = cp_exposed = 0.0
    if c > 1:
        cp_bw, cp_lat = hardware.link(t * c)
        fwd_bytes, bwd_bytes = cp_comm_bytes(
            model, seq_len, c, tp=t, micro_batch=b, dtype_bytes=B, grad_bytes=opt.cp_grad_bytes
        )
        step_f = fwd_bytes / (c - 1) / cp_bw + cp_lat
        step_b = bwd_bytes / (c - 1) / cp_bw + cp_lat
        if opt.cp_overlap:
            exp_f = (c - 1) * max(0.0, step_f - at_layer_fwd / c)
            exp_b = (c - 1) * max(0.0, step_b - k_bwd * at_layer_fwd / c)
        else:
            exp_f, exp_b = (c - 1) * step_f, (c - 1) * step_b
        cp_comm = (ls + recomputed) * (c - 1) * step_f + ls * (c - 1) * step_b
        cp_exposed = (ls + recomputed) * exp_f + ls * exp_b

    # ---- PP ------------------------------------------------------------------------------------------
    pp_comm = 0.0
    if p > 1:
        pp_bw, pp_lat = hardware.link(t * c * d * p)
        pp_comm = 2 * (tokens * h * B / t / pp_bw + pp_lat)

    t_mb = matmul + attention + overhead + tp_exposed + cp_exposed + pp_comm
    pipelined = (m + p - 1) * t_mb
    bubble = (p - 1) * t_mb

    # ---- FSDP over dp x cp ---------------------------------------------------------------------------
    n_f = d * c
    layer_local = model.layer_params / t
    head_local = model.head_params / t
    # the busiest stage: all of it without PP; with PP the last stage (head) or the first (embedding)
    embed_local = model.embedding_params / t
    stage_params = ls * layer_local + (head_local + embed_local if p == 1 else max(head_local, embed_local))
    fsdp_comm = fsdp_exposed = 0.0
    if n_f > 1:
        f_bw, f_lat = hardware.link(t * c * d)
        ag = collective_time(stage_params * B, n_f, f_bw, 0.0) + (ls + 1) * (n_f - 1) * f_lat
        rs = collective_time(stage_params * Bg, n_f, f_bw, 0.0) + (ls + 1) * (n_f - 1) * f_lat
        ag_count = m * (2 if opt.fsdp_reshard_after_forward else 1)
        rs_count = m if opt.grad_sync_every_microbatch else 1
        fsdp_comm = ag_count * ag + rs_count * rs
        compute_total = m * (matmul + attention)
        edge = (ag + rs) / (
            ls + 1
        )  # the first gather and the last reduce-scatter have nothing to hide behind
        fsdp_exposed = max(0.0, fsdp_comm - compute_total) + edge

    # ---- memory --------------------------------------------------------------------------------------
    per_layer_full = activation_bytes_per_token_layer(model, t, opt)
    per_layer_input = h * B / t
    kept = (ls - recomputed) * per_layer_full + recomputed * per_layer_input
    head_tokens = _head_activation_bytes_per_token(model, t, opt)
    inputs = 8.0 + 4.0 * model.head_dim  # int64 token ids, fp32 RoPE table (shared by all blocks)
    if p == 1:
        activation = tokens * (kept + inputs + head_tokens)
    else:  # 1F1B: the first stage holds min(p, m) micro-batches, the last one holds the head
        activation = max(tokens * min(p, m) * (kept + inputs), tokens * (kept + inputs + head_tokens))
    working = tokens * per_layer_full if recomputed else 0.0
    state = stage_params * opt.state_bytes_per_param / n_f
    transient = 2 * max(layer_local, head_local) * (B + Bg) if n_f > 1 else 0.0

    est.tokens_per_step = d * m * b * seq_len
    est.step_time_s = pipelined + fsdp_exposed
    est.tokens_per_s = est.tokens_per_step / est.step_time_s
    est.tokens_per_s_per_device = est.tokens_per_s / layout.world_size
    est.mfu = model_flops_per_token(model, seq_len) * est.tokens_per_s_per_device / hardware.peak_flops
    est.matmul_s, est.attention_s = m * matmul, m * attention
    est.recompute_s, est.overhead_s = m * recompute, m * overhead
    est.tp_comm_s, est.tp_exposed_s = m * tp_comm, m * tp_exposed
    est.cp_comm_s, est.cp_exposed_s = m * cp_comm, m * cp_exposed
    est.pp_comm_s, est.pp_bubble_s = m * pp_comm, bubble
    est.fsdp_comm_s, est.fsdp_exposed_s = fsdp_comm, fsdp_exposed
    est.activation_bytes, est.working_bytes = activation, working
    est.state_bytes, est.transient_bytes = state, transient
    est.peak_bytes = activation + working + state + transient
    est.fits = est.peak_bytes <= est.memory_limit_bytes
    if not est.fits:
        est.reason = (
            f"out of memory: {est.peak_bytes / GIB:.1f} GiB > {est.memory_limit_bytes / GIB:.1f} GiB "
            f"(activations {activation / GIB:.1f}, state {state / GIB:.1f})"
        )
    return est


# --------------------------------------------------------------------------------------------------------
# Enumeration and recommendation
# --------------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_layouts(
    model: ModelShape,
    seq_len: int,
    n_gpus: int,
    hardware: Hardware,
    *,
    cp_layout: str = "zigzag",
    allow_cross_node_tp: bool = False,
    ac_modes: Sequence[str] = AC_MODES,
    max_pp: int | None = None,
) -> list[Layout]:
    """All valid ``(tp, cp, pp, dp, ac)`` with ``tp * cp * pp * dp == n_gpus``.

    Args:
        model: Model shape.
        seq_len: Global sequence length.
        n_gpus: World size.
        hardware: Only its ``devices_per_node`` is used (tp stays within a node unless allowed).
        cp_layout: Layout of CP shards (sets the sequence divisor).
        allow_cross_node_tp: Also propose tp larger than a node.
        ac_modes: Activation checkpointing modes to propose.
        max_pp: Largest pipeline degree to propose (default: no limit).

    Returns:
        Layouts in a deterministic order; ``"selective"`` ones carry ``selective_every = 2``
        (:func:`recommend` picks the sparsest recomputation that fits).
    """
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    out: list[Layout] = []
    for tp in _divisors(n_gpus):
        if tp > hardware.devices_per_node and not allow_cross_node_tp:
            continue
        for cp in _divisors(n_gpus // tp):
            for pp in _divisors(n_gpus // (tp * cp)):
                if max_pp is not None and pp > max_pp:
                    continue
                dp = n_gpus // (tp * cp * pp)
                for ac in ac_modes:
                    layout = Layout(tp=tp, cp=cp, pp=pp, dp=dp, ac=ac)
                    if not validate_layout(model, layout, seq_len, cp_layout):
                        out.append(layout)
    return out


@dataclass
class Recommendation:
    """Result of :func:`recommend`.

    Attributes:
        model: Model shape.
        seq_len: Global sequence length.
        n_gpus: World size.
        hardware: Device description.
        options: Implementation choices.
        rows: Layouts that fit, best first (highest tokens/s).
        rejected: Layouts that do not fit (or cannot run), with ``reason``.
        baseline: The baseline layout's estimate (the seed's TP8 CP1 full recompute), fitting or not;
            None when it cannot be formed on ``n_gpus``.
    """

    model: ModelShape
    seq_len: int
    n_gpus: int
    hardware: Hardware
    options: CostOptions
    rows: list[Estimate] = field(default_factory=list)
    rejected: list[Estimate] = field(default_factory=list)
    baseline: Estimate | None = None

    @property
    def best(self) -> Estimate | None:
        """The recommended layout (fastest that fits), or None when nothing fits."""
        return self.rows[0] if self.rows else None

    def speedup(self, row: Estimate) -> float | None:
        """``row.tokens_per_s / baseline.tokens_per_s`` (None without a baseline)."""
        if self.baseline is None or self.baseline.tokens_per_s <= 0:
            return None
        return row.tokens_per_s / self.baseline.tokens_per_s


def microbatches_for(global_batch_tokens: int, seq_len: int, dp: int, micro_batch: int) -> int:
    """Micro-batches per DP replica to process ``global_batch_tokens`` (at least one sequence per replica)."""
    sequences = max(1, global_batch_tokens // seq_len)
    return max(1, math.ceil(sequences / (dp * micro_batch)))


def _estimate_for(
    model: ModelShape,
    layout: Layout,
    seq_len: int,
    hardware: Hardware,
    options: CostOptions,
    micro_batch: int,
    global_batch_tokens: int | None,
    microbatches: int,
) -> Estimate:
    m = microbatches
    if global_batch_tokens is not None:
        sequences = max(1, global_batch_tokens // seq_len)
        if layout.dp * micro_batch > sequences:
            est = Estimate(layout=layout, seq_len=seq_len, micro_batch=micro_batch, microbatches=1)
            est.reason = (
                f"dp {layout.dp} x micro_batch {micro_batch} exceeds the {sequences} sequences of the "
                f"global batch ({global_batch_tokens} tokens)"
            )
            return est
        m = microbatches_for(global_batch_tokens, seq_len, layout.dp, micro_batch)
    if layout.ac != "selective":
        return estimate(model, layout, seq_len, hardware, options, micro_batch=micro_batch, microbatches=m)
    # selective: the sparsest recomputation (largest N) that fits; N = 2 if none does
    ls = model.n_layers // layout.pp
    choices = [n for n in SELECTIVE_EVERY_CHOICES if 2 <= n <= ls] or [1]
    last: Estimate | None = None
    for n in choices:
        last = estimate(
            model,
            replace(layout, selective_every=n),
            seq_len,
            hardware,
            options,
            micro_batch=micro_batch,
            microbatches=m,
        )
        if last.fits:
            return last
    assert last is not None
    return last


def recommend(
    model: ModelShape,
    seq_len: int,
    n_gpus: int,
    hardware: Hardware,
    options: CostOptions | None = None,
    *,
    micro_batch: int = 1,
    global_batch_tokens: int | None = 4 * 2**20,
    microbatches: int = 1,
    layouts: Iterable[Layout] | None = None,
    baseline: Layout | None = None,
    allow_cross_node_tp: bool = False,
    max_pp: int | None = None,
) -> Recommendation:
    """Enumerate layouts, drop those that do not fit, rank the rest by throughput.

    Args:
        model: Model shape.
        seq_len: Global sequence length.
        n_gpus: World size.
        hardware: Device and links.
        options: Implementation choices (default :meth:`CostOptions.megatron`).
        micro_batch: Sequences per micro-batch.
        global_batch_tokens: Tokens per step; each layout gets ``ceil(sequences / (dp * micro_batch))``
            micro-batches per replica. None: use ``microbatches`` for every layout.
        microbatches: Micro-batches per replica when ``global_batch_tokens`` is None.
        layouts: Candidates (default :func:`enumerate_layouts`).
        baseline: Layout to compare against (default the seed's TP8 CP1 PP1 full recompute, dp = n_gpus / 8;
            TP = n_gpus below 8 devices). An invalid baseline leaves ``Recommendation.baseline`` None.
        allow_cross_node_tp: Propose tp larger than a node.
        max_pp: Largest pipeline degree to propose.

    Returns:
        The ranked table; ``best`` is the fastest layout that fits (never one that does not).
    """
    opt = options or CostOptions()
    candidates = (
        list(layouts)
        if layouts is not None
        else enumerate_layouts(
            model,
            seq_len,
            n_gpus,
            hardware,
            cp_layout=opt.cp_layout,
            allow_cross_node_tp=allow_cross_node_tp,
            max_pp=max_pp,
        )
    )
    rec = Recommendation(model=model, seq_len=seq_len, n_gpus=n_gpus, hardware=hardware, options=opt)
    for layout in candidates:
        if layout.world_size != n_gpus:
            raise ValueError(f"layout {layout.label} has world size {layout.world_size}, expected {n_gpus}")
        est = _estimate_for(
            model, layout, seq_len, hardware, opt, micro_batch, global_batch_tokens, microbatches
        )
        (rec.rows if est.fits else rec.rejected).append(est)
    rec.rows.sort(key=lambda e: (-e.tokens_per_s, e.peak_bytes))
    rec.rejected.sort(key=lambda e: (e.reason.startswith("out of memory") is False, -e.tokens_per_s))
    base_tp = min(8, n_gpus)
    if baseline is None and n_gpus % base_tp == 0:
        baseline = Layout(tp=base_tp, cp=1, pp=1, dp=n_gpus // base_tp, ac="full")
    if baseline is not None:
        rec.baseline = _estimate_for(
            model, baseline, seq_len, hardware, opt, micro_batch, global_batch_tokens, microbatches
        )
        if rec.baseline.tokens_per_s <= 0:  # invalid for this model / sequence
            rec.baseline = None
    return rec


# --------------------------------------------------------------------------------------------------------
# Calibration: predicted vs measured
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One measured layout (Note [Calibration file]).

    Attributes:
        layout: Degrees and AC mode.
        step_time_s: Measured step time (None if not measured).
        activation_bytes: Measured bytes saved for backward on the largest rank (None if not measured).
        seq_len: Global sequence length of the run.
        micro_batch: Sequences per micro-batch.
        microbatches: Micro-batches per step per DP replica.
    """

    layout: Layout
    step_time_s: float | None
    activation_bytes: float | None
    seq_len: int
    micro_batch: int = 1
    microbatches: int = 1


@dataclass(frozen=True)
class Calibration:
    """A parsed calibration file.

    Attributes:
        model: Model name in the file ("" if absent).
        hardware_overrides: ``Hardware`` field overrides.
        options_overrides: ``CostOptions`` field overrides.
        measurements: Measured rows.
    """

    model: str
    hardware_overrides: dict[str, Any]
    options_overrides: dict[str, Any]
    measurements: list[Measurement]


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration JSON file (Note [Calibration file]); errors name the offending key."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    known = {"model", "seq_len", "micro_batch", "hardware", "options", "measurements"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; expected {sorted(known)}")
    rows: list[Measurement] = []
    for i, row in enumerate(data.get("measurements", [])):
        if "layout" not in row:
            raise ValueError(f"{path}: measurements[{i}] has no 'layout'")
        seq_len = row.get("seq_len", data.get("seq_len"))
        if seq_len is None:
            raise ValueError(f"{path}: measurements[{i}] needs 'seq_len' (or a top-level 'seq_len')")
        layout = row["layout"]
        rows.append(
            Measurement(
                layout=Layout.parse(layout) if isinstance(layout, str) else Layout.from_dict(layout),
                step_time_s=row.get("step_time_s"),
                activation_bytes=row.get("activation_bytes"),
                seq_len=int(seq_len),
                micro_batch=int(row.get("micro_batch", data.get("micro_batch", 1))),
                microbatches=int(row.get("microbatches", 1)),
            )
        )
    return Calibration(
        model=str(data.get("model", "")),
        hardware_overrides=dict(data.get("hardware", {})),
        options_overrides=dict(data.get("options", {})),
        measurements=rows,
    )


@dataclass(frozen=True)
class Comparison:
    """Predicted vs measured for one layout.

    Attributes:
        measurement: The measured row.
        estimate: The prediction.
        step_time_error: ``(predicted - measured) / measured`` (None when not measured).
        activation_error: The same for activation bytes.
    """

    measurement: Measurement
    estimate: Estimate
    step_time_error: float | None
    activation_error: float | None


def _rel_error(predicted: float, measured: float | None) -> float | None:
    if measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured


def compare_measurements(
    model: ModelShape, measurements: Iterable[Measurement], hardware: Hardware, options: CostOptions
) -> list[Comparison]:
    """Predict every measured layout and return the relative errors."""
    out = []
    for meas in measurements:
        est = estimate(
            model,
            meas.layout,
            meas.seq_len,
            hardware,
            options,
            micro_batch=meas.micro_batch,
            microbatches=meas.microbatches,
        )
        out.append(
            Comparison(
                measurement=meas,
                estimate=est,
                step_time_error=_rel_error(est.step_time_s, meas.step_time_s),
                activation_error=_rel_error(est.activation_bytes, meas.activation_bytes),
            )
        )
    return out
