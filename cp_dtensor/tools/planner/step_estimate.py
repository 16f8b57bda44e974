"""The estimate: one training step of one :class:`~.parallel_plan.ParallelPlan` priced in time and memory.

:func:`estimate` adds up the terms of ``formulas.py`` for the busiest device; every formula is in
Note [Cost model], every constant in :class:`~.hardware.Hardware` or :class:`~.options.CostOptions`.

Note [Cost model]
~~~~~~~~~~~~~~~~~
Notation: ``S`` global sequence length, ``b`` micro-batch (sequences), ``t, c, p, d`` the tp, cp, pp, dp
degrees, ``m`` micro-batches per step per DP replica, ``h`` model dim, ``a`` query heads, ``g`` KV heads,
``hd = h / a``, ``kv = g * hd``, ``f`` FFN hidden size, ``V`` vocab, ``L`` layers, ``v`` stages per pp rank,
``Ls`` layers of the busiest pp rank (``L / p`` when p divides L; Note [Uneven pipeline stages] in
``parallel_plan.py``), ``B`` bytes of the compute dtype, ``Bg = 4`` bytes of fp32 gradients in
communication, ``P`` peak dense FLOP/s, ``e_mm`` / ``e_at`` achievable fractions for matmuls / attention
kernels, ``T = b*S/c`` tokens that one TP group holds (its CP shard).

Compute, per micro-batch, per device (the slowest pipeline stage, the one holding the output head)::

    W        = h*(h + 2*kv) + h*h + n_mlp*h*f        weights of one layer (n_mlp = 2 GELU, 3 SwiGLU)
    mm_fwd   = 2 * T * (Ls*W + h*V) / t               matmul FLOPs of the forward
    pairs    = S^2 / (2c)   causal, zigzag (exact: rank r holds chunks r and 2c-1-r, (S/2c)^2 * 2c pairs)
             = S^2 (2c-1) / (2c^2)   causal, contiguous (the last rank is the critical path)
             = S^2 / c      bidirectional
    at_fwd   = 4 * b * hd * (a/t) * pairs             QK^T and PV of one layer (causal = half of bidirectional)
    matmul   = 3 * mm_fwd + R * 2*T*W/t               backward = 2 forwards; R recomputed layers add one forward
    at_f     = at_fwd / (P e_at) * (1 + (k_c - 1) f_c)  f_c: part of the pairs in causal (diagonal) calls,
                                                     1/c zigzag, 1/(2c-1) contiguous, 1 without CP;
                                                     k_c = causal_attention_factor (masked blocks cost more)
    at_b     = k_bwd * at_f * e_at / e_at_bwd         flash backward k_bwd = 2.5 forwards (recomputes P)
    attn     = Ls (at_f + at_b) + R at_f + (2 Ls + R) * c * t_call     one kernel call per ring step and pass
    elem     = T * A(t) / bw_elem                     per block forward (A: saved bytes per token, below);
                                                     backward 2 elem (elementwise work streams activations)
    time     = matmul / (P e_mm) + attn + (2 Ls + R) * layer_overhead + (3 Ls + R) * elem

``R = Ls`` with full recompute (the "1/3 extra forward" of the matmuls), ``v * ceil(Ls / (v N))`` with
selective (layer-selective every N-th block of each stage, as ``cp_dtensor.parallelize.apply_ac``), 0 without.

GPU presets leave ``e_at_bwd = e_at``, ``k_c = 1``, ``t_call = 0``, ``bw_elem = None`` (elem = 0); a preset
calibrated on a CPU (``scripts/plan.py --calibrate``, Note [Machine calibration] in ``measure.py``) measures
all of them, with ``layer_overhead`` the fixed (Python, dispatch) part of a block pass.

Collectives: a ring collective of a tensor of ``size`` bytes over ``n`` ranks costs
``(n-1)/n * size / bw + (n-1) * latency``; a link is intra-node when the axis and every axis inside it
(mesh order pp, dp, cp, tp with tp innermost) fit in one node, inter-node otherwise. TP and FSDP use the
collective link (``Hardware.collective_link``: calibrated gloo collectives are slower than its p2p), the CP
ring and PP the point-to-point link. Where the transport copies on the CPU (``comm_compute_bandwidth``,
loopback gloo), every byte a rank sends or receives in the CP ring and in FSDP also costs it
``bytes / comm_compute_bandwidth`` of exposed time: the copy runs on the cores the overlap assumes free
(the serial TP collectives' measured wall time already contains it).

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

* PP: 1F1B, ``step = (m + (p - 1) / v) * t_mb``, bubble fraction ``(p-1)/(v*m+p-1)`` (``v = 1`` for 1F1B
  and GPipe; an interleaved schedule divides the bubble by ``v``); each micro-batch also sends its
  activation ``T*h*B/t`` forward and its gradient backward at each of the rank's ``v`` stage boundaries
  (not overlapped).
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
    step     = (m + (p - 1) / v) * t_mb + fsdp_exposed,  t_mb = compute + TP + CP exposed + PP p2p

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
the first stage holds ``min(p, m)`` micro-batches in flight (1F1B's count, used for every schedule: GPipe
keeps all ``m``, interleaving a little more). With ``CostOptions.cp_dtensor()`` and fp32, this matches
the bytes autograd saves for this project's Llama (none, full, selective) to 12 bytes.

Transient: while one attention layer runs, its CP ring holds buffers not saved for backward (K/V blocks
in flight, partial outputs, dK/dV accumulators): ``ring_transient_bytes`` (Note [Ring transient memory]
in ``formulas.py``), 8.0 x the local K+V bytes in backward at c >= 3, 7.0 x at c = 2. Only one layer's
ring is live at a time, so it is added once to the peak, on top of the activations saved by all layers.

State: FSDP2 with fp32 master weights: ``16`` bytes per parameter (4 param + 4 grad + 8 Adam) of the
stage's tp shard, divided by ``d*c``; while a layer runs, its unsharded bf16 parameters and gradients
(``B + 4`` bytes each, two layers with prefetch). A plan fits when
``state + transient + activations + recompute working set + ring transient <= memory * usable_fraction``.

Assumptions and simplifications: matmul efficiency does not depend on the shape; elementwise kernels cost
no time unless the preset prices them (``elementwise_bandwidth``); collectives of different axes
do not contend for links; the CP ring and FSDP run on separate streams; every GPU has its own inter-node
NIC; Megatron's attention-only selective recompute is not modelled because flash attention already stores
no ``s^2`` tensors (recomputing it would save only the lse), so "selective" is layer-selective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cp_dtensor.cost.hardware import GIB, Hardware
from cp_dtensor.tools.planner.formulas import (
    activation_bytes_per_token_layer,
    attention_flops,
    causal_fraction,
    collective_time,
    cp_comm_bytes,
    head_activation_bytes_per_token,
    model_flops_per_token,
    ring_transient_bytes,
)
from cp_dtensor.tools.planner.options import CostOptions
from cp_dtensor.tools.planner.parallel_plan import ParallelPlan, plan_problem, split_stages
from cp_dtensor.tools.planner.shapes import ModelShape

__all__ = ["Estimate", "estimate"]


@dataclass
class Estimate:
    """One plan priced for one step (times in seconds on the slowest device, memory in bytes).

    Attributes:
        plan: The candidate.
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
        overhead_s: Per-layer costs besides the matmuls and the attention kernel: fixed (launch, Python)
            and elementwise (norms, RoPE, SwiGLU; ``Hardware.elementwise_bandwidth``).
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
        ring_transient_bytes: Buffers of one attention layer's CP ring while it runs (Note [Ring transient
            memory] in ``formulas.py``); 0 without CP.
        peak_bytes: ``activation + working + ring_transient + state + transient``.
        memory_limit_bytes: ``memory_bytes * memory_usable_fraction``.
        fits: ``peak_bytes <= memory_limit_bytes`` and the plan is valid.
        reason: Why the plan is invalid or does not fit ("" when it fits).
    """

    plan: ParallelPlan
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
    ring_transient_bytes: float = 0.0
    peak_bytes: float = 0.0
    memory_limit_bytes: float = 0.0
    fits: bool = False
    reason: str = ""

    @property
    def compute_s(self) -> float:
        """Matmul + attention + overhead time."""
        return self.matmul_s + self.attention_s + self.overhead_s


def estimate(
    model: ModelShape,
    plan: ParallelPlan,
    seq_len: int,
    hardware: Hardware,
    options: CostOptions | None = None,
    *,
    micro_batch: int = 1,
    microbatches: int = 1,
) -> Estimate:
    """Price one training step of ``plan`` (Note [Cost model]).

    Args:
        model: Model shape.
        plan: Degrees and activation checkpointing.
        seq_len: Global sequence length.
        hardware: Device and links.
        options: Implementation choices (default: :meth:`CostOptions.megatron`).
        micro_batch: Sequences per micro-batch.
        microbatches: Micro-batches per step per DP replica (gradient accumulation / pipeline).

    Returns:
        The estimate; ``fits`` is False (with a ``reason``) when the plan is invalid or out of memory.
    """
    opt = options or CostOptions()
    if micro_batch < 1 or microbatches < 1:
        raise ValueError(f"micro_batch and microbatches must be >= 1, got {micro_batch}, {microbatches}")
    est = Estimate(plan=plan, seq_len=seq_len, micro_batch=micro_batch, microbatches=microbatches)
    est.memory_limit_bytes = hardware.memory_bytes * hardware.memory_usable_fraction
    problem = plan_problem(model, plan, seq_len, cp_layout=opt.cp_layout, pp_schedule=opt.pp_schedule)
    if problem is not None:
        est.reason = problem
        return est

    t, c, p, d, m, b = plan.tp, plan.cp, plan.pp, plan.dp, microbatches, micro_batch
    h, B, Bg = model.dim, opt.dtype_bytes, opt.grad_comm_bytes
    split = split_stages(model.n_layers, p, opt.pp_schedule)
    ls, v = split.rank_layers, split.stages_per_rank  # Ls: blocks of the busiest pp rank, v: its stages
    tokens = b * seq_len / c  # T: tokens of this TP group's CP shard
    recomputed = split.recomputed_layers(plan)
    flops_rate_mm = hardware.peak_flops * hardware.matmul_efficiency
    flops_rate_at = hardware.peak_flops * hardware.attention_efficiency
    flops_rate_at_bwd = hardware.attention_backward_rate

    # ---- compute (per micro-batch, last stage: layers + head) -------------------------------------------
    mm_layer_fwd = 2.0 * tokens * model.layer_matmul_params / t / flops_rate_mm
    mm_head_fwd = 2.0 * tokens * model.head_params / t / flops_rate_mm
    at_layer_fwd = (
        attention_flops(model, seq_len, cp=c, tp=t, micro_batch=b, cp_layout=opt.cp_layout) / flops_rate_at
    )
    # causal kernel calls (the ring's diagonal step) cost more per visible pair than unmasked blocks
    masked = causal_fraction(c, causal=model.causal, cp_layout=opt.cp_layout)
    at_layer_fwd *= 1.0 + (hardware.causal_attention_factor - 1.0) * masked
    k_bwd = opt.attention_backward_factor
    at_layer_bwd = k_bwd * at_layer_fwd * flops_rate_at / flops_rate_at_bwd
    calls = c * hardware.kernel_call_overhead_s  # one kernel call per ring step and pass
    matmul = 3 * (ls * mm_layer_fwd + mm_head_fwd) + recomputed * mm_layer_fwd
    attention = ls * (at_layer_fwd + at_layer_bwd + 2 * calls) + recomputed * (at_layer_fwd + calls)
    # elementwise work streams the block's activations: a forward its saved bytes, a backward twice that
    per_layer_full = activation_bytes_per_token_layer(model, t, opt)
    elementwise = 0.0
    if hardware.elementwise_bandwidth is not None:
        elementwise = tokens * per_layer_full / hardware.elementwise_bandwidth
    recompute = recomputed * (mm_layer_fwd + at_layer_fwd + calls + elementwise)
    overhead = (2 * ls + recomputed) * hardware.layer_overhead_s + (3 * ls + recomputed) * elementwise

    # ---- TP (sequence parallel) ---------------------------------------------------------------------
    tp_bw, tp_lat = hardware.collective_link(t)
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
    # seconds of this rank's compute per byte it sends or receives (0: the transport does not use the CPU)
    copy_cost = 1.0 / hardware.comm_compute_bandwidth if hardware.comm_compute_bandwidth else 0.0
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
            exp_b = (c - 1) * max(0.0, step_b - at_layer_bwd / c)
        else:
            exp_f, exp_b = (c - 1) * step_f, (c - 1) * step_b
        cp_comm = (ls + recomputed) * (c - 1) * step_f + ls * (c - 1) * step_b
        cp_exposed = (ls + recomputed) * exp_f + ls * exp_b
        # moving the bytes takes this rank's cores where the transport copies on the CPU (loopback gloo)
        cp_exposed += 2 * ((ls + recomputed) * fwd_bytes + ls * bwd_bytes) * copy_cost

    # ---- PP ------------------------------------------------------------------------------------------
    pp_comm = 0.0
    if p > 1:
        pp_bw, pp_lat = hardware.link(t * c * d * p)
        pp_comm = v * 2 * (tokens * h * B / t / pp_bw + pp_lat)  # send activation, receive its gradient

    t_mb = matmul + attention + overhead + tp_exposed + cp_exposed + pp_comm
    pipelined = (m + (p - 1) / v) * t_mb
    bubble = (p - 1) / v * t_mb

    # ---- FSDP over dp x cp ---------------------------------------------------------------------------
    n_f = d * c
    layer_local = model.layer_params / t
    head_local = model.head_params / t
    # the busiest stage: all of it without PP; with PP the last stage (head) or the first (embedding)
    embed_local = model.embedding_params / t
    stage_params = ls * layer_local + (head_local + embed_local if p == 1 else max(head_local, embed_local))
    fsdp_comm = fsdp_exposed = 0.0
    if n_f > 1:
        f_bw, f_lat = hardware.collective_link(t * c * d)
        ag = collective_time(stage_params * B, n_f, f_bw, 0.0) + (ls + 1) * (n_f - 1) * f_lat
        rs = collective_time(stage_params * Bg, n_f, f_bw, 0.0) + (ls + 1) * (n_f - 1) * f_lat
        ag_count = m * (2 if opt.fsdp_reshard_after_forward else 1)
        rs_count = m if opt.grad_sync_every_microbatch else 1
        fsdp_comm = ag_count * ag + rs_count * rs
        compute_total = m * (matmul + attention)
        # the first gather and the last reduce-scatter have nothing to hide behind
        edge = (ag + rs) / (ls + 1)
        fsdp_exposed = max(0.0, fsdp_comm - compute_total) + edge
        moved = 2 * (n_f - 1) / n_f * stage_params * (ag_count * B + rs_count * Bg)  # sent + received
        fsdp_exposed += moved * copy_cost

    # ---- memory --------------------------------------------------------------------------------------
    per_layer_input = h * B / t
    kept = (ls - recomputed) * per_layer_full + recomputed * per_layer_input
    head_tokens = head_activation_bytes_per_token(model, t, opt)
    inputs = 8.0 + 4.0 * model.head_dim  # int64 token ids, fp32 RoPE table (shared by all blocks)
    if p == 1:
        activation = tokens * (kept + inputs + head_tokens)
    else:  # 1F1B: the first stage holds min(p, m) micro-batches, the last one holds the head
        activation = max(tokens * min(p, m) * (kept + inputs), tokens * (kept + inputs + head_tokens))
    working = tokens * per_layer_full if recomputed else 0.0
    state = stage_params * opt.state_bytes_per_param / n_f
    transient = 2 * max(layer_local, head_local) * (B + Bg) if n_f > 1 else 0.0
    # one attention layer's ring at a time (Note [Ring transient memory]); the backward's is the larger
    ring = max(ring_transient_bytes(model, seq_len, c, tp=t, micro_batch=b, dtype_bytes=B))

    est.tokens_per_step = d * m * b * seq_len
    est.step_time_s = pipelined + fsdp_exposed
    est.tokens_per_s = est.tokens_per_step / est.step_time_s
    est.tokens_per_s_per_device = est.tokens_per_s / plan.world_size
    est.mfu = model_flops_per_token(model, seq_len) * est.tokens_per_s_per_device / hardware.peak_flops
    est.matmul_s, est.attention_s = m * matmul, m * attention
    est.recompute_s, est.overhead_s = m * recompute, m * overhead
    est.tp_comm_s, est.tp_exposed_s = m * tp_comm, m * tp_exposed
    est.cp_comm_s, est.cp_exposed_s = m * cp_comm, m * cp_exposed
    est.pp_comm_s, est.pp_bubble_s = m * pp_comm, bubble
    est.fsdp_comm_s, est.fsdp_exposed_s = fsdp_comm, fsdp_exposed
    est.activation_bytes, est.working_bytes = activation, working
    est.state_bytes, est.transient_bytes = state, transient
    est.ring_transient_bytes = ring
    est.peak_bytes = activation + working + ring + state + transient
    est.fits = est.peak_bytes <= est.memory_limit_bytes
    if not est.fits:
        est.reason = (
            f"out of memory: {est.peak_bytes / GIB:.1f} GiB > {est.memory_limit_bytes / GIB:.1f} GiB "
            f"(activations {activation / GIB:.1f}, state {state / GIB:.1f})"
        )
    return est
