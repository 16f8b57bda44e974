"""Implementation choices the cost model depends on: :class:`CostOptions` (Megatron on GPUs, or this repo)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from cp_dtensor.cost.hardware import replace_fields
from cp_dtensor.pipeline import stages_per_rank

__all__ = ["CostOptions"]


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
        pp_schedule: Pipeline schedule name of ``torch.distributed.pipelining`` (``"1F1B"``, ``"GPipe"``,
            ``"Interleaved1F1B"``); it sets the stages per pp rank (``cp_dtensor.pipeline.stages_per_rank``),
            hence how the layers are split (Note [Uneven pipeline stages]).
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
    pp_schedule: str = "1F1B"

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
        try:
            stages_per_rank(self.pp_schedule)
        except ValueError as e:
            raise ValueError(f"CostOptions.pp_schedule: {e}") from None

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
        return replace_fields(self, overrides)
