"""The cost of one CP attention layer on one rank, per strategy: the leaf of the cost model.

Prices p2p, all-gather and all-to-all / hybrid from an :class:`AttentionProblem` and a
:class:`~cp_dtensor.cost.hardware.Hardware`; the strategies of ``cp_dtensor.attention.strategies`` call these
functions (each strategy says which), and ``comm="auto"`` picks the fastest valid one. Imports nothing of
cp_dtensor but the hardware description.

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

from dataclasses import dataclass

from cp_dtensor.cost.hardware import Hardware

__all__ = [
    "AttentionProblem",
    "StrategyEstimate",
    "format_ms",
    "price_allgather",
    "price_group_all_to_all",
    "price_ring",
]


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
        comm: The strategy's registry name (``"p2p"``, ``"allgather"``, ``"alltoall"``, ``"hybrid"``, ...).
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
        """The name, with the group size for group strategies: ``p2p``, ``hybrid(2)``."""
        return f"{self.comm}({self.a2a_size})" if self.a2a_size and self.comm != "alltoall" else self.comm


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


def price_ring(p: AttentionProblem, hw: Hardware) -> StrategyEstimate:
    """The p2p ring (Note [CP strategy cost]); valid for every head count."""
    kv = 2.0 * p.local_tokens * p.kv_heads * p.head_dim
    fwd, bwd = _compute(p, hw, 1.0 / p.cp, p.cp)
    msg_f, msg_b = kv * p.dtype_bytes, kv * (p.dtype_bytes + p.grad_bytes)
    comm, exposed = _ring(p, hw, p.cp - 1, msg_f, msg_b, fwd, bwd)
    sent_f, sent_b = (p.cp - 1) * msg_f, (p.cp - 1) * msg_b
    return StrategyEstimate(
        "p2p", forward_bytes=sent_f, backward_bytes=sent_b, compute_s=fwd + bwd, comm_s=comm,
        exposed_s=exposed + _copy_cost(hw, sent_f + sent_b),
    )  # fmt: skip


def price_allgather(p: AttentionProblem, hw: Hardware) -> StrategyEstimate:
    """All-gather of K, V (Note [CP strategy cost]); valid for every head count."""
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


def price_group_all_to_all(p: AttentionProblem, hw: Hardware, k: int, name: str) -> StrategyEstimate:
    """All-to-all inside groups of ``k`` ranks x the ring across the ``cp / k`` groups (Note [CP strategy
    cost]; ``k = cp``: the plain all-to-all). The caller checks that ``k`` ranks can split the heads."""
    est = StrategyEstimate(name, a2a_size=k)
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


def format_ms(seconds: float) -> str:
    """Milliseconds, 3 significant digits (whole ms from 1 s on)."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"
