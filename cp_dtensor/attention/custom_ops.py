"""CP attention as ``torch.library`` custom ops: what ``torch.compile`` sees of the ring.

Note [Compiled CP attention]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Under ``torch.compile`` the ContextParallel style's mode is traced like any Python (dynamo inlines its
``__torch_function__``), and :func:`cp_dtensor.ring_attention` hands the attention itself to two opaque
custom ops, so a whole transformer block is one graph (``fullgraph=True``) and inductor fuses the code
around attention::

    compiled block graph
      norm, wq/wk/wv, rope (fused by inductor)
      cp_dtensor::attention_forward(q, k, v, document_ids?, layout_positions?, <settings>) -> out, lse
      wo, residual, norm, MLP (fused)
    backward graph
      cp_dtensor::attention_backward(dout, q, k, v, out, lse, <settings>) -> dq, dk, dv

Inside the ops everything runs eagerly, exactly as without compile: the cross-rank check, the plan, the ring
with its overlapped transfers (communication stays inside the op, overlapped as always). Ops take only
tensors and primitives, so the settings travel as a process-group name, a layout name (or the layout's
positions tensor) and integers; the fake implementations give dynamo the shapes (out like q, lse (B, Hq,
S_local) fp32). Only q, k, v, out and lse are saved for backward, as in eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cp_dtensor.attention.comm import ProcessGroupTransport, RingStats, ThreadHub, ThreadTransport
from cp_dtensor.attention.kernels import select_kernel
from cp_dtensor.attention.mask import AttentionMask
from cp_dtensor.attention.merge import accumulation_dtype
from cp_dtensor.layout import LayoutLike, SequenceLayout, check_rank_positions, tensor_digest

__all__ = [
    "CompiledCall",
    "attention_backward",
    "attention_forward",
    "compiled_ring_attention",
    "register_stats",
]

# RingStats objects by id: custom ops take no Python objects, so a call names its stats by an integer.
# A lookup table, never an option; it holds the few RingStats objects a process creates (trainer, tests).
_STATS: dict[int, RingStats] = {}


@dataclass(frozen=True)
class CompiledCall:
    """The primitive settings of one CP attention call, as the custom ops receive them."""

    group_name: str  # "" = one process (no group)
    is_causal: bool
    scale: float
    layout_name: str  # "zigzag", "contiguous", "positions" (layout_positions holds it), or "balanced-rule:<is_causal>:<left>:<right>"
    comm: str
    window_left: int
    window_right: int
    backend: str  # "" = choose from device and dtype
    a2a_size: int  # 0 = None
    stats_id: int  # 0 = no stats

    def resolve(
        self, q: torch.Tensor, document_ids: torch.Tensor | None, layout_positions: torch.Tensor | None
    ) -> tuple[ProcessGroupTransport, Any, RingStats | None]:
        """The transport, the algorithm variant and the stats of this call (eager, inside the op)."""
        from cp_dtensor.attention.ring import select_variant  # ring imports this module

        transport = _transport(self.group_name)
        layout = _layout(self.layout_name, layout_positions, document_ids, transport.size)
        mask = AttentionMask(self.is_causal, (self.window_left, self.window_right), document_ids)
        kernel = select_kernel(q.device, q.dtype, self.backend or None)
        variant = select_variant(
            self.comm, layout, mask, self.scale, kernel, transport.rank, transport.size, q.shape[2],
            self.a2a_size or None,
        )  # fmt: skip
        return transport, variant, _STATS.get(self.stats_id) if self.stats_id else None


def _call(*settings: Any) -> CompiledCall:
    return CompiledCall(*settings)


def _transport(group_name: str) -> ProcessGroupTransport | ThreadTransport:
    if not group_name:
        return ThreadTransport(ThreadHub(1), 0)
    return ProcessGroupTransport(dist.distributed_c10d._resolve_process_group(group_name))


def _layout(
    name: str, positions: torch.Tensor | None, document_ids: torch.Tensor | None, cp: int
) -> LayoutLike:
    """The layout a call names: a layout name, the positions of a layout object, or a balanced rule."""
    if name == "positions":
        assert positions is not None
        return _cached_layout(positions, cp)
    if name.startswith("balanced-rule:"):
        from cp_dtensor.balance import BalancedLayoutRule

        _, causal, left, right = name.split(":")
        if document_ids is None:
            raise ValueError("A balanced layout rule needs the batch's document_ids; the call passed none.")
        key = (name, tensor_digest(document_ids), cp)
        if key not in _LAYOUTS:  # once per batch, not per layer
            _LAYOUTS.clear()
            _LAYOUTS[key] = BalancedLayoutRule(causal == "1", (int(left), int(right)))(document_ids, cp)
        return _LAYOUTS[key]
    return name


def _cached_layout(positions: torch.Tensor, cp: int) -> SequenceLayout:
    """One SequenceLayout per distinct positions tensor content (built once per batch, not per layer)."""
    key = ("positions", tensor_digest(positions), cp)
    if key not in _LAYOUTS:
        _LAYOUTS.clear()
        _LAYOUTS[key] = SequenceLayout(positions.cpu(), cp, name="balanced")
    return _LAYOUTS[key]


_LAYOUTS: dict[tuple, LayoutLike] = {}  # the current batch's layout object (a cache of facts)


def register_stats(stats: RingStats) -> int:
    """Make ``stats`` reachable from the custom ops (call eagerly, before compiling); returns its id."""
    _STATS[id(stats)] = stats
    return id(stats)


def _check_across_ranks(
    call: CompiledCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None,
    layout_positions: torch.Tensor | None,
    token_positions: torch.Tensor | None,
) -> None:
    """The eager path's validation, layout check and cross-rank check (Note [Cross-rank call check])."""
    from cp_dtensor.attention.consistency import CallSignature, verify_call_across_ranks
    from cp_dtensor.attention.ring import validate_attention_inputs

    if not call.group_name:  # one process: only the local validation
        group, cp = None, 1
    else:
        group = dist.distributed_c10d._resolve_process_group(call.group_name)
        cp = dist.get_world_size(group)
    layout = _layout(call.layout_name, layout_positions, document_ids, cp)
    window = (call.window_left, call.window_right)
    error = None
    try:
        validate_attention_inputs(
            q, k, v, layout=layout, comm=call.comm, cp=cp, document_ids=document_ids, window_size=window,
            a2a_size=call.a2a_size or None,
        )  # fmt: skip
        if token_positions is not None and group is not None:
            check_rank_positions(token_positions, layout, dist.get_rank(group), cp)
    except ValueError as e:
        error = e
    if group is None:
        if error is not None:
            raise error
        return
    mask = AttentionMask(call.is_causal, window, document_ids)
    signature = CallSignature.of(
        q, k, v, layout=str(layout) if isinstance(layout, str) else repr(layout), is_causal=call.is_causal,
        comm=call.comm, scale=call.scale, backend=call.backend or None, mask=mask.fingerprint(),
        a2a_size=call.a2a_size or None,
    )  # fmt: skip
    verify_call_across_ranks(group, signature, error)


@torch.library.custom_op("cp_dtensor::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None,
    layout_positions: torch.Tensor | None,
    token_positions: torch.Tensor | None,
    group_name: str,
    is_causal: bool,
    scale: float,
    layout_name: str,
    comm: str,
    window_left: int,
    window_right: int,
    backend: str,
    a2a_size: int,
    stats_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CP attention forward on local shards: ``(out (B, Hq, S_local, D), lse (B, Hq, S_local) fp32)``.

    ``token_positions`` (optional): the query tokens' global positions, checked against the layout.
    """
    settings = (group_name, is_causal, scale, layout_name, comm, window_left, window_right, backend, a2a_size)
    call = _call(*settings, stats_id)
    _check_across_ranks(call, q, k, v, document_ids, layout_positions, token_positions)
    transport, variant, stats = call.resolve(q, document_ids, layout_positions)
    sent = transport.bytes_sent
    out, lse = variant.forward(q, k, v, transport, stats=stats, **variant.options)
    if stats is not None:
        stats.bytes_sent_forward += transport.bytes_sent - sent
    return out.contiguous(), lse.contiguous()


@attention_forward.register_fake
def _(q, k, v, document_ids, layout_positions, token_positions, *settings):
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
    is_causal: bool,
    scale: float,
    layout_name: str,
    comm: str,
    window_left: int,
    window_right: int,
    backend: str,
    a2a_size: int,
    stats_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CP attention backward on local shards: ``(dq, dk, dv)`` like q, k, v."""
    call = _call(
        group_name,
        is_causal,
        scale,
        layout_name,
        comm,
        window_left,
        window_right,
        backend,
        a2a_size,
        stats_id,
    )
    transport, variant, stats = call.resolve(q, document_ids, layout_positions)
    sent = transport.bytes_sent
    dq, dk, dv = variant.backward(
        dout.contiguous(), q, k, v, out, lse, transport, stats=stats, **variant.options
    )
    if stats is not None:
        stats.bytes_sent_backward += transport.bytes_sent - sent
    # dK and dV are views of one (2, ...) accumulator: custom-op outputs must not alias each other.
    return (
        dq.contiguous(),
        dk.clone(memory_format=torch.contiguous_format),
        dv.clone(memory_format=torch.contiguous_format),
    )


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, document_ids, layout_positions, *settings):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, document_ids, layout_positions, _token_positions, *settings = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids, layout_positions)
    ctx.settings = settings


def _backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, document_ids, layout_positions = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, document_ids, layout_positions, *ctx.settings)
    return (dq, dk, dv) + (None,) * (3 + len(ctx.settings))


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def compiled_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    mask: AttentionMask,
    layout: LayoutLike,
    comm: str,
    scale: float,
    backend: str | None,
    a2a_size: int | None,
    stats: RingStats | None,
    token_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`cp_dtensor.ring_attention` through the custom ops (the path taken under ``torch.compile``).

    ``layout`` may also be a :class:`~cp_dtensor.BalancedLayoutRule` (applied to the document ids inside the op).
    """
    stats_id = id(stats) if stats is not None else 0  # registered eagerly (register_stats)
    positions = layout.positions if isinstance(layout, SequenceLayout) else None
    out, _ = attention_forward(
        q, k, v, mask.document_ids, positions, token_positions, group.group_name if group is not None else "",
        bool(mask.is_causal), float(scale), _layout_spec(layout), comm, int(mask.window[0]), int(mask.window[1]),
        backend or "", a2a_size or 0, stats_id,
    )  # fmt: skip
    return out


def _layout_spec(layout: Any) -> str:
    """A layout as the ops' string argument (Note [Compiled CP attention])."""
    if isinstance(layout, SequenceLayout):
        return "positions"
    if isinstance(layout, str):
        return layout
    causal, (left, right) = getattr(layout, "is_causal", None), getattr(layout, "window_size", (None, None))
    if causal is None:
        raise ValueError(
            f"Under torch.compile a CP layout must be a name, a layout object or a BalancedLayoutRule; got {layout!r}."
        )
    return f"balanced-rule:{int(causal)}:{left}:{right}"
