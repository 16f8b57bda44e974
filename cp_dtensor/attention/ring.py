"""The context-parallel attention op: ring (p2p) and all-gather variants, forward and backward.

Note [Ring attention, forward and backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Forward (CP = 4, rank 1 shown; KV packed as one (2, B, Hkv, S_local, D) buffer, double-buffered)::

    step:        0            1            2            3
    send KV:   kv1 -> r2    kv0 -> r2    kv3 -> r2    (none)
    compute:   q1 x kv1     q1 x kv0     q1 x kv3     q1 x kv2      (blocks: Note [Ring schedule])
    merge:     (o, lse) <- lse-merge of each block, fp32            (Note [LSE merge])

The transfer of the next KV is in flight while the current block is computed. Only q, k, v (local),
out and lse are saved for backward.

Backward: KV rotate again exactly as in forward. Each rank adds its dK/dV contribution for the KV it holds
into an fp32 accumulator that travels *with* that KV: the accumulator of kv_src starts at rank src+1, visits
src+2, ..., and after CP-1 hops arrives home at src, which adds its own contribution (computed at step 0).
That is a reduce-scatter of dK/dV done point to point: (CP-1) sends of KV and (CP-1) of dK/dV per rank,
the minimum. Sends and receives are posted in the same order on every rank, so transports that match
messages by order (NCCL) pair them correctly::

    rank r, step s >= 2:  recv acc(kv_src) <- r-1 | exchange KV | compute block | acc += dK,dV | send acc -> r+1

All-gather variant (``comm="allgather"``, Llama 3 style): all-gather KV once, compute the local queries
against the gathered sequence (Note [All-gather blocks]); backward gathers KV again instead of saving it
and reduce-scatters dK/dV in fp32.

All-to-all (``comm="alltoall"``, Ulysses) and hybrid (``comm="hybrid"``, all-to-all inside groups of
``a2a_size`` ranks x this ring across them) variants live in ``alltoall.py`` (Notes [Ulysses all-to-all],
[Hybrid all-to-all x ring]); ``select_variant`` picks them like the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from cp_dtensor.attention.alltoall import (
    AllToAllPlan,
    alltoall_backward,
    alltoall_forward,
    build_group_plan,
    local_backward,
    local_forward,
    validate_head_split,
)
from cp_dtensor.attention.comm import (
    DKV_TAG,
    KV_TAG,
    ProcessGroupTransport,
    RingStats,
    SendWindow,
    ThreadHub,
    ThreadTransport,
    Transport,
    pack_kv,
    timed_wait,
)
from cp_dtensor.attention.comm_choice import resolve_comm
from cp_dtensor.attention.consistency import CallSignature, verify_call_across_ranks
from cp_dtensor.attention.custom_ops import compiled_ring_attention
from cp_dtensor.attention.kernels import AttentionKernel, select_kernel
from cp_dtensor.attention.mask import AttentionMask, validate_mask_inputs
from cp_dtensor.attention.mask_schedule import build_masked_plan
from cp_dtensor.attention.masked_ring import (
    masked_allgather_backward,
    masked_allgather_forward,
    masked_ring_backward,
    masked_ring_forward,
)
from cp_dtensor.attention.merge import accumulation_dtype, merge_block_
from cp_dtensor.attention.schedule import Part, build_allgather_blocks, build_ring_schedule
from cp_dtensor.layout import (
    LayoutLike,
    SequenceLayout,
    chunks_per_rank,
    layout_name,
    shard_sequence_for_rank,
    unshard_sequence_from_shards,
    validate_layout,
    validate_seq_len,
)

__all__ = [
    "COMM_MODES",
    "allgather_backward",
    "allgather_forward",
    "ring_attention",
    "ring_backward",
    "ring_forward",
    "select_variant",
    "validate_attention_inputs",
]

COMM_MODES: tuple[str, ...] = ("p2p", "allgather", "alltoall", "hybrid", "auto")  # auto: comm_choice.py


_wait = timed_wait


def _count_work(stats: RingStats | None, phase: str, q: torch.Tensor, elements_per_head: int) -> None:
    if stats is not None:
        stats.count(phase, q.shape[0] * q.shape[1] * elements_per_head)  # B x Hq x visible pairs


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    transport: Transport,
    *,
    is_causal: bool,
    scale: float,
    layout: str,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring forward on local shards; returns ``out`` (q's dtype) and fp32 ``lse`` (B, Hq, S_local)."""
    s_local = q.shape[2]
    cp = transport.size
    schedule = build_ring_schedule(transport.rank, cp, layout, is_causal)
    acc_dtype = accumulation_dtype(q.dtype)
    out_acc = lse_acc = None
    kv = pack_kv(k, v)  # (2, B, Hkv, S_local, D)
    for step, block in enumerate(schedule):
        pending = transport.exchange(kv, KV_TAG) if step < cp - 1 else None
        if block is not None:
            q_rows, kv_rows = block.q_part.rows(s_local), block.kv_part.rows(s_local)
            out_blk, lse_blk = kernel.forward(
                q[:, :, q_rows],
                kv[0][:, :, kv_rows],
                kv[1][:, :, kv_rows],
                is_causal=block.causal,
                scale=scale,
            )
            _count_work(stats, "forward", q, block.score_elements(s_local))
            if out_acc is None:  # step 0: the diagonal block covers every row; its fresh outputs
                assert block.q_part is Part.ALL  # become the accumulators (no copy when already fp32)
                out_acc = out_blk.to(acc_dtype)  # (B, Hq, S_local, D)
                lse_acc = lse_blk.to(acc_dtype).contiguous()  # (B, Hq, S_local)
            else:
                merge_block_(out_acc[:, :, q_rows], lse_acc[:, :, q_rows], out_blk, lse_blk)
            del out_blk, lse_blk  # merged: not alive during the next step's kernel
        if pending is not None:
            kv = _wait(pending, stats)
    assert out_acc is not None and lse_acc is not None
    return out_acc.to(q.dtype), lse_acc


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    transport: Transport,
    *,
    is_causal: bool,
    scale: float,
    layout: str,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ring backward: KV rotate again and the fp32 dK/dV accumulators travel home with them."""
    s_local = q.shape[2]
    cp = transport.size
    schedule = build_ring_schedule(transport.rank, cp, layout, is_causal)
    acc_dtype = accumulation_dtype(q.dtype)
    kv = pack_kv(k, v)  # (2, B, Hkv, S_local, D)
    dq_acc: torch.Tensor | None = None  # (B, Hq, S_local, D), from step 0's block
    dkv_own: torch.Tensor | None = None  # (2, B, Hkv, S_local, D), this rank's own dK/dV, fp32
    sends = SendWindow(lambda p: _wait(p, stats))
    dkv: torch.Tensor | None = None  # the accumulator relayed this step
    for step, block in enumerate(schedule):
        # Order matters for order-matched transports: acc recv, then KV exchange (see the Note).
        acc_in = transport.recv(kv, DKV_TAG, dtype=acc_dtype) if step >= 2 else None
        pending_kv = transport.exchange(kv, KV_TAG) if step < cp - 1 else None
        # The previous step's dK/dV send completes before this step computes (its receiver posted the
        # matching recv first thing in its step), so one accumulator is in flight while one is filled:
        # transient memory does not grow with the number of steps. Drop the sent one before computing.
        sends.drain()
        dkv = None
        grads = None
        if block is not None:
            q_rows, kv_rows = block.q_part.rows(s_local), block.kv_part.rows(s_local)
            dq_blk, dk_blk, dv_blk = kernel.backward(
                dout[:, :, q_rows], q[:, :, q_rows], kv[0][:, :, kv_rows], kv[1][:, :, kv_rows],
                out[:, :, q_rows], lse[:, :, q_rows], is_causal=block.causal, scale=scale,
            )  # fmt: skip
            _count_work(stats, "backward", q, block.score_elements(s_local))
            if dq_acc is None:  # step 0: the diagonal block covers every row
                dq_acc = dq_blk.to(acc_dtype)
            else:
                dq_acc[:, :, q_rows] += dq_blk
            grads = (kv_rows, dk_blk, dv_blk)
            del dq_blk, dk_blk, dv_blk  # held by grads / freed: not alive during the next step's kernel
        if step == 0:
            assert grads is not None and grads[0] == slice(0, s_local)
            dkv_own = _new_dkv_accumulator(kv, acc_dtype, grads)  # all rows: one converting copy
        elif acc_in is None:  # step 1: this rank starts kv_src's accumulator
            dkv = _new_dkv_accumulator(kv, acc_dtype, grads)
            sends.post(transport.send(dkv, DKV_TAG))
        else:
            dkv = _wait(acc_in, stats)
            if grads is not None:
                dkv[0][:, :, grads[0]] += grads[1]
                dkv[1][:, :, grads[0]] += grads[2]
            sends.post(transport.send(dkv, DKV_TAG))
        if pending_kv is not None:
            kv = _wait(pending_kv, stats)
    assert dq_acc is not None and dkv_own is not None
    if cp > 1:
        dkv_own += _wait(transport.recv(dkv_own, DKV_TAG), stats)
    sends.drain()
    return dq_acc.to(q.dtype), dkv_own[0].to(k.dtype), dkv_own[1].to(v.dtype)


def _new_dkv_accumulator(
    kv: torch.Tensor, dtype: torch.dtype, grads: tuple[slice, torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """A (2, B, Hkv, S_local, D) accumulator holding one block's dK/dV in its rows and zeros elsewhere."""
    acc = torch.empty(kv.shape, dtype=dtype, device=kv.device)
    if grads is None:
        return acc.zero_()
    rows, dk, dv = grads
    s_local = kv.shape[3]
    if rows.start > 0:
        acc[:, :, :, : rows.start].zero_()
    if rows.stop < s_local:
        acc[:, :, :, rows.stop :].zero_()
    acc[0][:, :, rows].copy_(dk)
    acc[1][:, :, rows].copy_(dv)
    return acc


def _gather_kv_natural(k: torch.Tensor, v: torch.Tensor, transport: Transport, layout: str) -> torch.Tensor:
    gathered = transport.all_gather(pack_kv(k, v))  # (CP, 2, B, Hkv, S_local, D), rank order
    return unshard_sequence_from_shards(
        list(gathered.unbind(0)), seq_dim=3, layout=layout
    )  # (2, B, Hkv, S, D)


def allgather_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    transport: Transport,
    *,
    is_causal: bool,
    scale: float,
    layout: str,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather forward: gather KV, compute local queries against it without masked work."""
    s_local = q.shape[2]
    kv = _gather_kv_natural(k, v, transport, layout)  # (2, B, Hkv, S, D)
    acc_dtype = accumulation_dtype(q.dtype)
    out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # (B, Hq, S_local, D)
    lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)  # (B, Hq, S_local)
    for block in build_allgather_blocks(transport.rank, transport.size, layout, is_causal, s_local):
        out_blk, lse_blk = kernel.forward(
            q[:, :, block.q_rows], kv[0][:, :, block.kv_rows], kv[1][:, :, block.kv_rows],
            is_causal=block.causal, scale=scale,
        )  # fmt: skip
        _count_work(stats, "forward", q, block.score_elements())
        merge_block_(out_acc[:, :, block.q_rows], lse_acc[:, :, block.q_rows], out_blk, lse_blk)
    return out_acc.to(q.dtype), lse_acc


def allgather_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    transport: Transport,
    *,
    is_causal: bool,
    scale: float,
    layout: str,
    kernel: AttentionKernel,
    stats: RingStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather backward: re-gather KV, compute, reduce-scatter dK/dV (fp32) to their owners."""
    s_local = q.shape[2]
    cp = transport.size
    kv = _gather_kv_natural(k, v, transport, layout)  # (2, B, Hkv, S, D)
    acc_dtype = accumulation_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)  # (2, B, Hkv, S, D), natural order
    for block in build_allgather_blocks(transport.rank, cp, layout, is_causal, s_local):
        r, c = block.q_rows, block.kv_rows
        dq_blk, dk_blk, dv_blk = kernel.backward(
            dout[:, :, r], q[:, :, r], kv[0][:, :, c], kv[1][:, :, c], out[:, :, r], lse[:, :, r],
            is_causal=block.causal, scale=scale,
        )  # fmt: skip
        _count_work(stats, "backward", q, block.score_elements())
        dq_acc[:, :, r] += dq_blk
        dkv[0][:, :, c] += dk_blk
        dkv[1][:, :, c] += dv_blk
    per_rank = torch.stack([shard_sequence_for_rank(dkv, r, cp, 3, layout) for r in range(cp)])
    dkv_own = transport.reduce_scatter(per_rank)  # (2, B, Hkv, S_local, D)
    return dq_acc.to(q.dtype), dkv_own[0].to(k.dtype), dkv_own[1].to(v.dtype)


_FORWARD = {"p2p": ring_forward, "allgather": allgather_forward}
_BACKWARD = {"p2p": ring_backward, "allgather": allgather_backward}
_MASKED_FORWARD = {"p2p": masked_ring_forward, "allgather": masked_allgather_forward}
_MASKED_BACKWARD = {"p2p": masked_ring_backward, "allgather": masked_allgather_backward}


@dataclass(frozen=True)
class _Variant:
    """One call's algorithm: forward/backward functions and their keyword options (everything but tensors)."""

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    options: dict[str, Any]


def select_variant(
    comm: str,
    layout: LayoutLike,
    mask: AttentionMask,
    scale: float,
    kernel: AttentionKernel,
    rank: int,
    cp: int,
    s_local: int,
    a2a_size: int | None = None,
) -> _Variant:
    """The unmasked zigzag/contiguous ring, or the masked ring (documents, windows, layout objects); for
    ``alltoall`` / ``hybrid``, the all-to-all inside groups of ``a2a_size`` ranks (cp for ``alltoall``)
    around the ring variant of the cp / a2a_size super-shards (Note [Hybrid all-to-all x ring])."""
    if comm in ("alltoall", "hybrid"):
        size = cp if comm == "alltoall" else a2a_size
        assert size is not None and cp % size == 0, "validate_attention_inputs checks a2a_size"
        group = build_group_plan(layout, cp, size, rank, s_local * cp)
        if group.n_groups == 1 and mask.is_plain:  # one group, no mask: the kernel on the whole sequence
            options = {"is_causal": mask.is_causal, "scale": scale, "kernel": kernel}
            ring = _Variant(local_forward, local_backward, options)
        else:
            ring = select_variant(
                "p2p", group.ring_layout, mask, scale, kernel, group.index, group.n_groups, size * s_local
            )
        plan = AllToAllPlan(group, ring.forward, ring.backward, ring.options)
        return _Variant(alltoall_forward, alltoall_backward, {"plan": plan})
    if mask.is_plain and isinstance(layout, str):
        options = {"is_causal": mask.is_causal, "scale": scale, "layout": layout, "kernel": kernel}
        return _Variant(_FORWARD[comm], _BACKWARD[comm], options)
    plan = build_masked_plan(mask, layout, cp, s_local * cp, rank)
    return _Variant(
        _MASKED_FORWARD[comm], _MASKED_BACKWARD[comm], {"plan": plan, "scale": scale, "kernel": kernel}
    )


class _ContextParallelAttention(torch.autograd.Function):
    """Autograd wrapper: saves only local q, k, v, out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, transport, variant, stats):
        sent = transport.bytes_sent
        out, lse = variant.forward(q, k, v, transport, stats=stats, **variant.options)
        if stats is not None:
            stats.bytes_sent_forward += transport.bytes_sent - sent
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (transport, variant, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # create_graph=True: the ring's backward is not itself differentiable
            raise RuntimeError(
                "cp_dtensor ring attention does not support double backward (create_graph=True, e.g. a "
                "gradient penalty): its backward is a hand-written ring, not a differentiable graph."
            )
        q, k, v, out, lse = ctx.saved_tensors
        transport, variant, stats = ctx.config
        sent = transport.bytes_sent
        dq, dk, dv = variant.backward(dout, q, k, v, out, lse, transport, stats=stats, **variant.options)
        if stats is not None:
            stats.bytes_sent_backward += transport.bytes_sent - sent
        return dq, dk, dv, None, None, None


def validate_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: LayoutLike,
    comm: str,
    cp: int = 1,
    document_ids: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    a2a_size: int | None = None,
) -> None:
    """Check shapes, dtypes, layout, comm mode and mask of local shards; ``ValueError`` naming the problem."""
    validate_layout(layout)
    if comm not in COMM_MODES:
        raise ValueError(f"Unknown CP comm mode {comm!r}; expected one of {COMM_MODES}.")
    _validate_a2a_size(comm, a2a_size, cp)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S_local, D), got shape {tuple(t.shape)}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, local sequence length "
            f"and head dim (B, _, S_local, D); CP attention is self-attention over one sharded sequence."
        )
    if k.shape[1] == 0 or q.shape[1] == 0:
        raise ValueError(
            f"This rank holds {q.shape[1]} query heads and {k.shape[1]} key/value heads: each rank needs at "
            f"least one of each. When heads are sharded over another mesh axis (e.g. tp), its size must divide "
            f"both head counts (replicate the KV heads instead, or use a smaller tp)."
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"The number of query heads ({q.shape[1]}) must be a multiple of the number of key/value heads "
            f"({k.shape[1]}) for MHA/GQA/MQA."
        )
    if comm in ("alltoall", "hybrid"):
        size = cp if comm == "alltoall" else a2a_size
        assert size is not None
        validate_head_split(q.shape[1], k.shape[1], size, comm, cp)
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    per_rank = chunks_per_rank(layout)
    if q.shape[2] % per_rank != 0:
        raise ValueError(
            f"Local sequence length {q.shape[2]} must be a multiple of {per_rank} for layout {layout!r} "
            f"(each rank holds {per_rank} chunks of equal length)."
        )
    if isinstance(layout, SequenceLayout):
        validate_seq_len(q.shape[2] * cp, cp, layout)
        if layout.batch != q.shape[0]:
            raise ValueError(
                f"{layout!r} was built for {layout.batch} batch rows but q has {q.shape[0]}; build the layout "
                f"from this batch's document_ids."
            )
    validate_mask_inputs(document_ids, window_size, batch=q.shape[0], seq_len=q.shape[2] * cp)


def _validate_a2a_size(comm: str, a2a_size: int | None, cp: int) -> None:
    """``a2a_size`` is required by ``hybrid`` (a divisor of ``cp``) and meaningless for the other modes."""
    if comm == "hybrid":
        if a2a_size is None:
            raise ValueError(
                f"comm='hybrid' needs a2a_size=k, the number of consecutive CP ranks that share heads by "
                f"all-to-all (cp / k groups then form rings); k must divide the CP degree {cp}, e.g. "
                f"a2a_size=2 for CP 4 = 2 x 2."
            )
        if isinstance(a2a_size, bool) or not isinstance(a2a_size, int) or a2a_size < 1 or cp % a2a_size:
            raise ValueError(
                f"a2a_size={a2a_size!r} must be a positive divisor of the CP degree {cp} (comm='hybrid' "
                f"splits the CP group into groups of a2a_size consecutive ranks)."
            )
    elif a2a_size is not None and not (comm == "alltoall" and a2a_size == cp):
        raise ValueError(
            f"a2a_size={a2a_size!r} is only used with comm='hybrid' (comm='alltoall' uses the whole CP group "
            f"of {cp} ranks); got comm={comm!r}. Pass comm='hybrid' or leave a2a_size=None."
        )


def _process_group(mesh: DeviceMesh | dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    if mesh is None:
        return None
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(
                f"ring_attention needs a 1-D CP mesh, got axes {mesh.mesh_dim_names}; pass e.g. world_mesh['cp']."
            )
        return mesh.get_group()
    return mesh


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mesh: DeviceMesh | dist.ProcessGroup | None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    layout: LayoutLike = "zigzag",
    comm: str = "p2p",
    document_ids: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str | None = None,
    stats: RingStats | None = None,
    a2a_size: int | None = None,
) -> torch.Tensor:
    """Context-parallel scaled dot-product attention on local sequence shards; differentiable.

    Equals ``F.scaled_dot_product_attention`` on the full sequence (GQA expanded) with the mask below,
    sharded by ``layout``.

    Args:
        q: (B, Hq, S_local, D) this rank's queries, in ``layout`` order (see :func:`cp_dtensor.shard_sequence`).
        k: (B, Hkv, S_local, D) this rank's keys; ``Hq % Hkv == 0`` (MHA, GQA, MQA).
        v: (B, Hkv, S_local, D) this rank's values.
        mesh: the 1-D CP ``DeviceMesh`` (or its ``ProcessGroup``); ``None`` or size 1 means one process.
        is_causal: causal (decoder) masking over global positions; otherwise bidirectional.
        scale: softmax scale; default ``1 / sqrt(D)``.
        layout: ``"zigzag"`` (load-balanced causal), ``"contiguous"``, or a layout object from
            :func:`cp_dtensor.balanced_layout`.
        comm: ``"p2p"`` (ring of isend/irecv, overlapped), ``"allgather"`` (gather KV once),
            ``"alltoall"`` (Ulysses: all-to-all to head shards of the whole sequence and back; the local
            query heads must be a multiple of cp and the KV heads divide cp or be a multiple of it), or
            ``"hybrid"`` (all-to-all inside groups of ``a2a_size`` consecutive ranks, the ring across
            groups; the same head rule with ``a2a_size`` in place of cp), or ``"auto"``: the planner's cost
            model picks one of them (and the group size) per call shape (``cp_dtensor.choose_comm``).
        document_ids: (B, S) integer ids of packed documents for the *global* sequence in natural order,
            identical on every rank; a query sees only keys of its own document. Documents are contiguous.
        window_size: ``(left, right)``: key j is visible from query i only if ``i - left <= j <= i + right``
            (flash-attn's convention); -1 = unbounded.
        backend: kernel adapter name (``cpu_flash``, ``flash``, ``cudnn``, ``efficient``, ``math``);
            default from device and dtype.
        stats: optional :class:`RingStats` to accumulate bytes sent and work done on this rank.
        a2a_size: ranks per all-to-all group for ``comm="hybrid"`` (required there; must divide the CP
            degree); None otherwise.

    With documents or a window, only visible pairs are computed and only KV rows some query needs are
    sent (Note [Masked ring]). Without them and with a named layout on one process this is one
    ``F.scaled_dot_product_attention`` call (``backend`` and ``stats`` unused).

    Returns:
        (B, Hq, S_local, D) this rank's attention output shard.
    """
    group = _process_group(mesh)
    cp = 1 if group is None else dist.get_world_size(group)
    comm, a2a_size = resolve_comm(comm, a2a_size, q, k, cp, is_causal)  # "auto": the cost model's choice
    mask = AttentionMask(is_causal, tuple(window_size), document_ids)  # type: ignore[arg-type]
    if torch.compiler.is_compiling() and not (cp == 1 and mask.is_plain and isinstance(layout, str)):
        # Under torch.compile the attention is an opaque custom op; its eager body validates, checks
        # across ranks and runs the same variants (Note [Compiled CP attention]).
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return compiled_ring_attention(
            q, k, v, group, mask=mask, layout=layout, comm=comm, scale=scale, backend=backend,
            a2a_size=a2a_size, stats=stats,
        )  # fmt: skip
    options = {
        "layout": layout,
        "comm": comm,
        "cp": cp,
        "document_ids": document_ids,
        "window_size": window_size,
        "a2a_size": a2a_size,
    }
    if cp == 1:
        validate_attention_inputs(q, k, v, **options)
        if mask.is_plain and isinstance(layout, str):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )
        transport: Transport = ThreadTransport(ThreadHub(1), 0)
    else:
        assert group is not None
        error: ValueError | None = None
        try:
            validate_attention_inputs(q, k, v, **options)
        except ValueError as e:
            error = e
        signature = CallSignature.of(
            q, k, v, layout=layout_name(layout), is_causal=is_causal, comm=comm, scale=scale, backend=backend,
            mask=mask.fingerprint(), a2a_size=a2a_size,
        )  # fmt: skip
        verify_call_across_ranks(group, signature, error)
        transport = ProcessGroupTransport(group)
    if q.shape[2] == 0:  # an empty sequence on every rank (checked above): an empty result, like SDPA
        return q * 0.0 + (k.sum() + v.sum()) * 0.0  # (B, Hq, 0, D), differentiable
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kernel = select_kernel(q.device, q.dtype, backend)
    variant = select_variant(comm, layout, mask, scale, kernel, transport.rank, cp, q.shape[2], a2a_size)
    return _ContextParallelAttention.apply(q, k, v, transport, variant, stats)
