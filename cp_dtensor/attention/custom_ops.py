"""CP attention as ``torch.library`` custom ops: what ``torch.compile`` sees of the one CP attention call.

Note [Compiled CP attention]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Under ``torch.compile`` the ContextParallel style's mode is traced like any Python (dynamo inlines its
``__torch_function__``), and :func:`cp_dtensor.attention.api.attend` hands the attention itself to two opaque
custom ops, so a whole transformer block is one graph (``fullgraph=True``) and inductor fuses the code
around attention::

    compiled block graph
      norm, wq/wk/wv, rope (fused by inductor)
      [cp_dtensor::layout_positions(document_ids, ...) -> positions]     a layout rule, per batch
      cp_dtensor::attention_forward(q, k, v, document_ids?, layout_positions?, token_positions?, <call>)
          -> out, lse
      wo, residual, norm, MLP (fused)
    backward graph
      cp_dtensor::attention_backward(dout, q, k, v, out, lse, document_ids?, layout_positions?, <call>)

Inside the ops everything runs eagerly through :func:`~cp_dtensor.attention.call.build_call`, exactly as
without compile: ``comm="auto"`` resolved from the real shapes (so dynamic shapes and new lengths need no
constant folding), the cross-rank check, the plan, the ring with its overlapped transfers. Ops take only
tensors and primitives: the call travels as :class:`OpCall` (a process-group name, a layout name or the
layout's positions tensor, the strategy name, integers), written and read by this module alone. The fake
implementations give dynamo the shapes (out like q, lse (B, Hq, S_local) fp32). Only q, k, v, out and lse
are saved for backward, as in eager; the backward replays the forward's verified call without checking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cp_dtensor.attention.call import build_call
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.merge import accumulation_dtype
from cp_dtensor.attention.settings import CPSettings
from cp_dtensor.attention.stats import stats_by_handle
from cp_dtensor.layout import LayoutRule, SequenceLayout, cached_sequence_layout

__all__ = ["OpCall", "attention_backward", "attention_forward", "compiled_attention"]


@dataclass(frozen=True)
class OpCall:
    """The primitive form of one call's settings and mask, as the custom ops receive them.

    ``layout`` is a layout name, ``"default:<name>"`` (the settings named none) or ``"positions"`` (the
    ``layout_positions`` tensor holds it); ``group_name`` "" means one process; ``a2a_size`` 0 means None;
    ``backend`` "" means chosen from device and dtype; ``scale`` < 0 means ``1 / sqrt(D)``;
    ``piece_packing`` as ``CPSettings.piece_packing``.
    """

    group_name: str
    layout: str
    comm: str
    a2a_size: int
    backend: str
    cost_hardware: str
    is_causal: bool
    window_left: int
    window_right: int
    scale: float
    stats_id: int
    piece_packing: str = "auto"

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        document_ids: torch.Tensor | None,
        layout_positions: torch.Tensor | None,
        token_positions: torch.Tensor | None = None,
        *,
        check: bool = True,
    ):
        """The :class:`~cp_dtensor.attention.call.CPAttentionCall` these primitives describe (eager)."""
        group = dist.distributed_c10d._resolve_process_group(self.group_name) if self.group_name else None
        default = "zigzag"
        if self.layout == "positions":
            assert layout_positions is not None
            cp = 1 if group is None else dist.get_world_size(group)
            layout: Any = cached_sequence_layout(layout_positions, cp)
        elif self.layout.startswith("default:"):
            layout, default = None, self.layout.removeprefix("default:")
        else:
            layout = self.layout
        settings = CPSettings(
            layout=layout, comm=self.comm, a2a_size=self.a2a_size or None, backend=self.backend or None,
            cost_hardware=self.cost_hardware, piece_packing=self.piece_packing,
            stats=stats_by_handle(self.stats_id),
        )  # fmt: skip
        mask = AttentionMask(self.is_causal, (self.window_left, self.window_right), document_ids)
        return build_call(
            q, k, v, group, settings=settings, mask=mask, scale=None if self.scale < 0 else self.scale,
            token_positions=token_positions, default_layout=default, check=check,
        )  # fmt: skip


@torch.library.custom_op("cp_dtensor::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None,
    layout_positions: torch.Tensor | None,
    token_positions: torch.Tensor | None,
    group_name: str,
    layout: str,
    comm: str,
    a2a_size: int,
    backend: str,
    cost_hardware: str,
    is_causal: bool,
    window_left: int,
    window_right: int,
    scale: float,
    stats_id: int,
    piece_packing: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """CP attention forward on local shards: ``(out (B, Hq, S_local, D), lse (B, Hq, S_local) fp32)``.

    ``token_positions`` (optional): the query tokens' global positions, checked against the layout.
    """
    primitives = (
        group_name,
        layout,
        comm,
        a2a_size,
        backend,
        cost_hardware,
        is_causal,
        window_left,
        window_right,
    )
    call = OpCall(*primitives, scale, stats_id, piece_packing).run(
        q, k, v, document_ids, layout_positions, token_positions
    )
    out, lse = call.forward(q, k, v)
    return out.contiguous(), lse.contiguous()


@attention_forward.register_fake
def _(q, k, v, document_ids, layout_positions, token_positions, *primitives):
    # contiguous, as the eager body returns them (not empty_like: q is often a transposed view)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("cp_dtensor::attention_backward", mutates_args=())
def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    document_ids: torch.Tensor | None,
    layout_positions: torch.Tensor | None,
    group_name: str,
    layout: str,
    comm: str,
    a2a_size: int,
    backend: str,
    cost_hardware: str,
    is_causal: bool,
    window_left: int,
    window_right: int,
    scale: float,
    stats_id: int,
    piece_packing: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CP attention backward on local shards: ``(dq, dk, dv)`` like q, k, v."""
    primitives = (
        group_name,
        layout,
        comm,
        a2a_size,
        backend,
        cost_hardware,
        is_causal,
        window_left,
        window_right,
    )
    call = OpCall(*primitives, scale, stats_id, piece_packing).run(
        q, k, v, document_ids, layout_positions, check=False
    )
    dq, dk, dv = call.backward(dout.contiguous(), q, k, v, out, lse)
    # dK and dV may be views of one (2, ...) accumulator: custom-op outputs must not alias each other.
    return (
        dq.contiguous(),
        dk.clone(memory_format=torch.contiguous_format),
        dv.clone(memory_format=torch.contiguous_format),
    )


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, document_ids, layout_positions, *primitives):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, document_ids, layout_positions, _token_positions, *primitives = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids, layout_positions)
    ctx.primitives = primitives


def _backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, document_ids, layout_positions = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, document_ids, layout_positions, *ctx.primitives)
    return (dq, dk, dv) + (None,) * (3 + len(ctx.primitives))


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    settings: CPSettings,
    mask: AttentionMask,
    scale: float | None,
    token_positions: torch.Tensor | None = None,
    default_layout: str = "zigzag",
    layout_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~cp_dtensor.attention.api.attend` through the custom ops (the path under ``torch.compile``)."""
    layout = settings.layout
    positions = None
    if layout_positions is not None:  # the batch's layout, travelling with it (Note [Travelling layout])
        positions, name = layout_positions, "positions"
    elif isinstance(layout, LayoutRule):
        if mask.document_ids is None:
            raise ValueError(
                f"The CP layout rule {layout!r} needs the batch's document_ids; the attention call passed none."
            )
        cp = 1 if group is None else dist.get_world_size(group)
        positions = layout.positions(mask.document_ids, cp)  # traceable (a custom op for the balanced rule)
        name = "positions"
    elif isinstance(layout, SequenceLayout):
        positions, name = layout.positions, "positions"
    else:
        name = layout if layout is not None else f"default:{default_layout}"
    stats = settings.stats
    out, _ = attention_forward(
        q, k, v, mask.document_ids, positions, token_positions, group.group_name if group is not None else "",
        name, settings.comm, settings.a2a_size or 0, settings.backend or "", settings.cost_hardware,
        bool(mask.is_causal), int(mask.window[0]), int(mask.window[1]), -1.0 if scale is None else float(scale),
        stats.handle if stats is not None else 0, settings.piece_packing,
    )  # fmt: skip
    return out
