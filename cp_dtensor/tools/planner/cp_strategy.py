"""Which CP communication strategy for one attention layer: p2p ring, all-gather, all-to-all or hybrid.

Note [CP strategy cost]
~~~~~~~~~~~~~~~~~~~~~~~
One attention layer on one rank, forward + backward, for each strategy the op offers
(``cp_dtensor.ring_attention(comm=...)``). ``T = b*S/c`` local tokens, ``a``/``g`` query/KV heads of the
rank (after tp), ``hd`` head dim, ``B`` bytes of q/k/v, ``Bg`` of the fp32 gradient accumulators::

    compute   at_f = 4 b hd a pairs / (P e_at) * (1 + (k_c - 1) f_c) + calls * t_call   (Note [Cost model])
              at_b = k_bwd at_f e_at / e_at_bwd;  pairs = S^2/(2c) (causal, balanced), S^2/c bidirectional

    p2p       c-1 ring steps, each hides its K,V message behind one block (1/c of the compute):
                fwd msg 2 T g hd B, bwd msg 2 T g hd (B + Bg); link of the cp group (span t*c devices)
                exposed = (c-1) max(0, msg/bw + lat - at/c)                       f_c = 1/c, c calls
    allgather one all-gather of K,V before compute; backward re-gathers and reduce-scatters dK,dV:
                nothing overlaps (Llama 3's choice: simple, exposed)              f_c = 1,   2 calls
    alltoall  (Ulysses, k = c) q,k,v to head shards of the whole sequence, out back; backward sends
                q,k,v,out,dout and brings dq,dk,dv home (Note [Ulysses all-to-all]); nothing overlaps:
                a2a_q = (k-1)/k T a hd B,  a2a_kv = (k-1) T g' hd B, g' = max(1, g/k)
                fwd = 2 a2a_q + 2 a2a_kv;  bwd = 4 a2a_q + 2 a2a_kv + 2 a2a_kv Bk/B
                (Bk = B when each KV head has one user, else Bg: shared dK/dV are summed in fp32)
                                                                                  f_c = 1,   1 call
    hybrid k  the all-to-all inside groups of k consecutive ranks (span t*k) + the p2p ring over the
                m = c/k groups on super-shards of k T tokens and a/k heads (g' KV heads):
                ring msg = 2 k T g' hd B (fwd), 2 k T g' hd (B + Bg) (bwd), hidden behind 1/m of the
                compute each                                                      f_c = 1/m, m calls

An all-to-all over a group that spans nodes sends ``(k - k_n)/(k - 1)`` of its bytes over the NICs
(``k_n`` group members per node) and the rest over NVLink, at the same time: its time is the larger of
the two. Where the transport copies on the CPU (``comm_compute_bandwidth``), every byte sent or received
also costs ``bytes / comm_compute_bandwidth`` of exposed time, as in Note [Cost model].

The choice is the fastest valid strategy (compute + exposed communication); within 1% the simpler one
wins, in the order p2p, hybrid (smaller k first), alltoall, allgather. All strategies save the same bytes
for backward (only the local shards); transient buffers are not part of the choice. The masks of packed
documents and sliding windows reduce the compute every strategy does; they are priced as causal here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cp_dtensor.attention.alltoall import heads_split
from cp_dtensor.tools.planner.formulas import kv_heads_per_rank
from cp_dtensor.tools.planner.hardware import Hardware
from cp_dtensor.tools.planner.shapes import ModelShape

__all__ = [
    "AttentionProblem",
    "StrategyEstimate",
    "choose_strategy",
    "format_ms",
    "model_attention_problem",
    "strategy_estimates",
]

# Order of preference among strategies that are as fast (within ``TIE``): simpler first.
_PREFERENCE = {"p2p": 0, "hybrid": 1, "alltoall": 2, "allgather": 3}
TIE = 0.01


@dataclass(frozen=True)
class AttentionProblem:
    """One attention layer on one rank: what the strategy choice depends on.

    Attributes:
        heads: Query heads of the rank (after any tp split).
        kv_heads: Key/value heads of the rank (after any tp split).
        head_dim: Head dimension.
        seq_len: Global sequence length.
        cp: CP degree.
        tp: TP degree (tp ranks are innermost in the mesh: a cp group spans ``t*c`` devices).
        micro_batch: Sequences per micro-batch.
        dtype_bytes: Bytes per element of q, k, v.
        grad_bytes: Bytes per element of the dK/dV accumulators (fp32: 4; fp64 inputs: 8).
        causal: Causal attention (balanced layout) or bidirectional.
        attention_backward_factor: Backward FLOPs in forwards (flash recomputes P: 2.5).
    """

    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    cp: int
    tp: int = 1
    micro_batch: int = 1
    dtype_bytes: int = 2
    grad_bytes: int = 4
    causal: bool = True
    attention_backward_factor: float = 2.5

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "head_dim", "seq_len", "cp", "tp", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"AttentionProblem.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")

    @property
    def local_tokens(self) -> float:
        """``T = b * S / c``."""
        return self.micro_batch * self.seq_len / self.cp


@dataclass
class StrategyEstimate:
    """One strategy's predicted cost for one layer on one rank (forward + backward).

    Attributes:
        comm: ``"p2p"``, ``"allgather"``, ``"alltoall"`` or ``"hybrid"``.
        a2a_size: Ranks per all-to-all group (``hybrid``; ``cp`` for ``alltoall``; None otherwise).
        valid: False when the heads cannot be split (``reason`` says why).
        reason: Why it is invalid, or (on the chosen one) why it was chosen.
        forward_bytes, backward_bytes: Bytes this rank sends.
        compute_s: Attention kernel time (calls included).
        comm_s: Time of all transfers.
        exposed_s: The part of ``comm_s`` not hidden behind compute (plus CPU copy cost).
    """

    comm: str
    a2a_size: int | None = None
    valid: bool = True
    reason: str = ""
    forward_bytes: float = 0.0
    backward_bytes: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_s: float = 0.0

    @property
    def time_s(self) -> float:
        """Compute + exposed communication."""
        return self.compute_s + self.exposed_s

    @property
    def label(self) -> str:
        """``p2p``, ``allgather``, ``alltoall`` or ``hybrid(k)``."""
        return f"hybrid({self.a2a_size})" if self.comm == "hybrid" else self.comm

    def rank_key(self) -> tuple[int, int]:
        """Preference among equally fast strategies: simpler first, then smaller all-to-all groups."""
        return _PREFERENCE[self.comm], self.a2a_size or 0


def _compute(p: AttentionProblem, hw: Hardware, causal_part: float, calls: int) -> tuple[float, float]:
    """``(forward, backward)`` attention kernel seconds of one layer on one rank."""
    s2 = float(p.seq_len) ** 2
    pairs = s2 / (2 * p.cp) if p.causal else s2 / p.cp
    rate = hw.peak_flops * hw.attention_efficiency
    fwd = 4.0 * p.micro_batch * p.head_dim * p.heads * pairs / rate
    fwd *= 1.0 + (hw.causal_attention_factor - 1.0) * (causal_part if p.causal else 0.0)
    bwd = p.attention_backward_factor * fwd * rate / hw.attention_backward_rate
    call = calls * hw.kernel_call_overhead_s
    return fwd + call, bwd + call


def _copy_cost(hw: Hardware, sent_bytes: float) -> float:
    """Seconds of this rank's cores moving ``sent_bytes`` out and as many in (CPU-copying transports)."""
    return 2.0 * sent_bytes / hw.comm_compute_bandwidth if hw.comm_compute_bandwidth else 0.0


def _ring(
    p: AttentionProblem, hw: Hardware, steps: int, msg_f: float, msg_b: float, fwd: float, bwd: float
) -> tuple[float, float]:
    """``(comm, exposed)`` seconds of ``steps`` ring hops over the cp group, hidden behind 1/(steps+1)
    of the compute each."""
    if steps == 0:
        return 0.0, 0.0
    bw, lat = hw.link(p.tp * p.cp)
    step_f, step_b = msg_f / bw + lat, msg_b / bw + lat
    comm = steps * (step_f + step_b)
    exposed = steps * (max(0.0, step_f - fwd / (steps + 1)) + max(0.0, step_b - bwd / (steps + 1)))
    return comm, exposed


def _all_to_all_time(p: AttentionProblem, hw: Hardware, k: int, sent: float) -> float:
    """Seconds of one all-to-all in which a rank sends ``sent`` bytes to the other ``k - 1`` members of
    its group of ``k`` consecutive cp ranks (NVLink and NIC shares in parallel)."""
    per_node = max(1, min(k, hw.devices_per_node // p.tp))
    intra_bw, intra_lat = hw.link(1)
    if per_node >= k:
        return sent / intra_bw + intra_lat
    inter_bw, inter_lat = hw.link(hw.devices_per_node + 1)
    inter_part = (k - per_node) / (k - 1)
    return max(sent * (1 - inter_part) / intra_bw + intra_lat, sent * inter_part / inter_bw + inter_lat)


def _split_problem(p: AttentionProblem, k: int) -> str:
    """Why ``k`` ranks cannot share the heads ("" when they can; Note [Ulysses all-to-all])."""
    if heads_split(p.heads, p.kv_heads, k):
        return ""
    return f"{p.heads} heads / {p.kv_heads} KV heads per rank do not split over {k} ranks"


def _p2p(p: AttentionProblem, hw: Hardware) -> StrategyEstimate:
    kv = 2.0 * p.local_tokens * p.kv_heads * p.head_dim
    fwd, bwd = _compute(p, hw, 1.0 / p.cp, p.cp)
    msg_f, msg_b = kv * p.dtype_bytes, kv * (p.dtype_bytes + p.grad_bytes)
    comm, exposed = _ring(p, hw, p.cp - 1, msg_f, msg_b, fwd, bwd)
    sent_f, sent_b = (p.cp - 1) * msg_f, (p.cp - 1) * msg_b
    return StrategyEstimate(
        "p2p", forward_bytes=sent_f, backward_bytes=sent_b, compute_s=fwd + bwd, comm_s=comm,
        exposed_s=exposed + _copy_cost(hw, sent_f + sent_b),
    )  # fmt: skip


def _allgather(p: AttentionProblem, hw: Hardware) -> StrategyEstimate:
    kv = 2.0 * p.local_tokens * p.kv_heads * p.head_dim
    fwd, bwd = _compute(p, hw, 1.0, 2)
    bw, lat = hw.collective_link(p.tp * p.cp)
    c = p.cp
    sent_f = (c - 1) * kv * p.dtype_bytes  # a ring collective moves (c-1)/c of the c shards through a rank
    sent_grad = (c - 1) * kv * p.grad_bytes
    gather = sent_f / bw + (c - 1) * lat
    scatter = sent_grad / bw + (c - 1) * lat
    sent_b = sent_f + sent_grad
    comm = 2 * gather + scatter
    return StrategyEstimate(
        "allgather", forward_bytes=sent_f, backward_bytes=sent_b, compute_s=fwd + bwd, comm_s=comm,
        exposed_s=comm + _copy_cost(hw, sent_f + sent_b),
    )  # fmt: skip


def _hybrid(p: AttentionProblem, hw: Hardware, k: int) -> StrategyEstimate:
    comm_name = "alltoall" if k == p.cp else "hybrid"
    est = StrategyEstimate(comm_name, a2a_size=k)
    problem = _split_problem(p, k)
    if problem:
        est.valid, est.reason = False, problem
        return est
    m = p.cp // k
    t, hd, B = p.local_tokens, p.head_dim, p.dtype_bytes
    g = max(1, p.kv_heads // k)
    shared = p.kv_heads < k  # a KV head has several users: its dK/dV are summed in fp32
    a2a_q = (k - 1) / k * t * p.heads * hd * B
    a2a_kv = (k - 1) * t * g * hd * B
    a2a_dkv = a2a_kv * (p.grad_bytes / B if shared else 1.0)
    sent_f_a2a = 2 * a2a_q + 2 * a2a_kv
    sent_b_a2a = 4 * a2a_q + 2 * a2a_kv + 2 * a2a_dkv
    fwd, bwd = _compute(p, hw, 1.0 / m, m)
    ring_kv = 2.0 * k * t * g * hd
    msg_f, msg_b = ring_kv * B, ring_kv * (B + p.grad_bytes)
    ring_comm, ring_exposed = _ring(p, hw, m - 1, msg_f, msg_b, fwd, bwd)
    # forward: q,k,v in, out back; backward: q,k,v,out,dout in, dq,dk,dv back (two all-to-alls each)
    a2a = sum(
        _all_to_all_time(p, hw, k, sent)
        for sent in (a2a_q + 2 * a2a_kv, a2a_q, 3 * a2a_q + 2 * a2a_kv, a2a_q + 2 * a2a_dkv)
    )
    est.forward_bytes = sent_f_a2a + (m - 1) * msg_f
    est.backward_bytes = sent_b_a2a + (m - 1) * msg_b
    est.compute_s = fwd + bwd
    est.comm_s = a2a + ring_comm
    est.exposed_s = a2a + ring_exposed + _copy_cost(hw, est.forward_bytes + est.backward_bytes)
    return est


def strategy_estimates(problem: AttentionProblem, hardware: Hardware) -> list[StrategyEstimate]:
    """Every strategy for ``problem`` (Note [CP strategy cost]): p2p, allgather, hybrid for each proper
    divisor ``k`` of the CP degree, alltoall; invalid ones carry their reason. Empty for ``cp == 1``."""
    if problem.cp == 1:
        return []
    rows = [_p2p(problem, hardware), _allgather(problem, hardware)]
    rows += [_hybrid(problem, hardware, k) for k in range(2, problem.cp) if problem.cp % k == 0]
    rows.append(_hybrid(problem, hardware, problem.cp))
    return rows


def format_ms(seconds: float) -> str:
    """Milliseconds, 3 significant digits (whole ms from 1 s on)."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _why(best: StrategyEstimate, other: StrategyEstimate | None, problem: AttentionProblem) -> str:
    """One sentence on why ``best`` beats the runner-up ``other``."""
    if other is None:
        return f"{best.label}: the only strategy that can split the heads"
    gap = f"{format_ms(best.time_s)} ms vs {other.label} {format_ms(other.time_s)} ms per layer"
    if best.exposed_s + 1e-12 < other.exposed_s:
        if best.comm == "p2p":
            why = (
                "the ring hides its K/V transfers behind the blocks"
                if best.exposed_s == 0
                else "the ring's steps overlap the blocks and expose the least"
            )
        elif best.comm == "hybrid":
            why = (
                f"all-to-all inside groups of {best.a2a_size} ranks, the ring of {problem.cp // best.a2a_size} "
                f"groups hidden behind compute"
            )
        elif best.comm == "alltoall":
            sent = best.forward_bytes + best.backward_bytes
            why = (
                f"it sends fewer bytes than {other.label}"
                if sent < other.forward_bytes + other.backward_bytes
                else f"its four all-to-alls cost less than {other.label}'s exposed steps (blocks too short to hide "
                f"them; latency-bound)"
            )
        else:
            why = "one collective costs less than the ring's exposed steps"
        why += f" (exposed {format_ms(best.exposed_s)} ms vs {format_ms(other.exposed_s)} ms)"
    else:
        why = f"less kernel time ({format_ms(best.compute_s)} ms vs {format_ms(other.compute_s)} ms: fewer, larger calls)"
    return f"{best.label}: {why}; {gap}"


def choose_strategy(
    problem: AttentionProblem, hardware: Hardware
) -> tuple[StrategyEstimate, list[StrategyEstimate]]:
    """The strategy to use for ``problem`` on ``hardware`` and every estimate (Note [CP strategy cost]).

    The fastest valid one wins; within 1% (``TIE``) the simpler one, in the order p2p, hybrid (smaller
    groups first), alltoall, allgather. The chosen estimate's ``reason`` says why in one sentence.

    Raises:
        ValueError: ``problem.cp == 1`` (nothing to choose).
    """
    rows = strategy_estimates(problem, hardware)
    if not rows:
        raise ValueError("No CP strategy to choose with a CP degree of 1")
    valid = [r for r in rows if r.valid]  # p2p and allgather are always valid
    fastest = min(r.time_s for r in valid)
    best = min((r for r in valid if r.time_s <= fastest * (1 + TIE)), key=StrategyEstimate.rank_key)
    others = sorted((r for r in valid if r is not best), key=lambda r: r.time_s)
    chosen = replace(best, reason=_why(best, others[0] if others else None, problem))
    return chosen, [chosen if r is best else r for r in rows]


def model_attention_problem(
    model: ModelShape, seq_len: int, cp: int, tp: int = 1, *, micro_batch: int = 1, dtype_bytes: int = 2
) -> AttentionProblem:
    """The :class:`AttentionProblem` of one of ``model``'s attention layers under ``tp`` x ``cp``
    (KV heads replicated when fewer than tp, as :func:`~.formulas.kv_heads_per_rank`)."""
    return AttentionProblem(
        heads=model.n_heads // tp, kv_heads=kv_heads_per_rank(model, tp), head_dim=model.head_dim,
        seq_len=seq_len, cp=cp, tp=tp, micro_batch=micro_batch, dtype_bytes=dtype_bytes,
        grad_bytes=max(4, dtype_bytes), causal=model.causal,
    )  # fmt: skip
