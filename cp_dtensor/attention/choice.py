"""``comm="auto"``: the CP strategy chosen per call shape by the cost model, over the strategy registry.

The op's callers name a strategy (``p2p``, ``allgather``, ``alltoall``, ``hybrid`` or any registered one)
or ask for ``auto``. ``auto`` prices every registered strategy at every group size it offers
(``cp_dtensor.cost``, Note [CP strategy cost]), skips those whose own validity rule refuses the heads
(the rule the op raises with), and keeps the fastest; within 1% the one with the lower ``preference``
(simpler), then the smaller group. It is resolved once per shape from the heads, KV heads, head dim,
sequence length, CP degree, dtype, mask and a hardware description; every rank resolves the same shapes
with the same preset, so all ranks pick the same strategy (the cross-rank check would name a mismatch).
``hybrid`` without a group size is resolved the same way among the hybrid group sizes.

Hardware: ``"auto"`` takes the preset of the device (CPU: ``cpu``; CUDA: ``h200`` / ``h100`` / ``a100`` by
device name, else ``h100``, with torchrun's ``LOCAL_WORLD_SIZE`` as the GPUs per node); a preset name or a
calibration JSON written by ``scripts/plan.py --calibrate`` replaces it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

from cp_dtensor.attention.strategy import AUTO, get_strategy, strategy_names
from cp_dtensor.cost.attention import AttentionProblem, StrategyEstimate, format_ms
from cp_dtensor.cost.hardware import Hardware, build_hardware, load_hardware_spec

__all__ = [
    "TIE",
    "CommChoice",
    "choose_comm",
    "choose_strategy",
    "hardware_for_device",
    "preference_key",
    "resolve_comm",
    "strategy_estimates",
]

TIE = 0.01
"""Strategies within this fraction of the fastest count as equally fast (the simpler one wins)."""

_DTYPE_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class CommChoice:
    """A resolved strategy: ``comm`` and ``a2a_size`` to pass to the op, and why.

    Attributes:
        comm: a registered strategy name (``"p2p"``, ``"allgather"``, ``"alltoall"``, ``"hybrid"``, ...).
        a2a_size: Ranks per all-to-all group for strategies that take one (``hybrid``); None otherwise.
        reason: One sentence on why (empty when the caller named the strategy).
        table: One line per strategy with its predicted time per layer (empty when named).
    """

    comm: str
    a2a_size: int | None
    reason: str = ""
    table: tuple[str, ...] = ()


def hardware_for_device(device: torch.device | str, hardware: str = "auto") -> Hardware:
    """The cost model's :class:`~cp_dtensor.cost.Hardware` for ``device``: a preset by device
    (``hardware="auto"``), a preset name (``h100``, ``h200``, ``a100``, ``cpu``) or a calibration JSON path."""
    if hardware != "auto":
        return load_hardware_spec(hardware)
    device = torch.device(device)
    if device.type != "cuda":
        return build_hardware("cpu")
    name = torch.cuda.get_device_name(device).upper()
    preset = build_hardware(next((p for p in ("h200", "h100", "a100") if p.upper() in name), "h100"))
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun: the processes (GPUs) of this node
    if per_node.isdigit() and int(per_node) > 0:
        preset = preset.with_overrides({"devices_per_node": int(per_node)})
    return preset


def strategy_estimates(
    problem: AttentionProblem, hardware: Hardware, names: tuple[str, ...] | None = None
) -> list[StrategyEstimate]:
    """Every registered strategy (or those in ``names``) at every group size it offers, priced for
    ``problem``; those whose validity rule refuses the heads carry ``valid=False`` and the rule's reason.
    Empty for ``cp == 1``."""
    if problem.cp == 1:
        return []
    rows = []
    for name in names or strategy_names():
        strategy = get_strategy(name)
        for size in strategy.group_sizes(problem.cp):
            reason = strategy.check(problem.heads, problem.kv_heads, problem.cp, size)
            if reason is not None:
                rows.append(StrategyEstimate(name, a2a_size=size, valid=False, reason=reason))
            else:
                rows.append(strategy.estimate(problem, hardware, size))
    return rows


def preference_key(row: StrategyEstimate) -> tuple[int, int]:
    """Order among equally fast strategies: the strategy's ``preference`` (simpler first), then smaller groups."""
    return get_strategy(row.comm).preference, row.a2a_size or 0


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
        elif best.comm == "allgather":
            why = "one collective costs less than the ring's exposed steps"
        else:
            why = "it exposes the least communication"
        why += f" (exposed {format_ms(best.exposed_s)} ms vs {format_ms(other.exposed_s)} ms)"
    else:
        why = f"less kernel time ({format_ms(best.compute_s)} ms vs {format_ms(other.compute_s)} ms: fewer, larger calls)"
    return f"{best.label}: {why}; {gap}"


def choose_strategy(
    problem: AttentionProblem, hardware: Hardware, names: tuple[str, ...] | None = None
) -> tuple[StrategyEstimate, list[StrategyEstimate]]:
    """The strategy to use for ``problem`` on ``hardware`` and every estimate (Note [CP strategy cost]).

    The fastest valid one wins; within 1% (:data:`TIE`) the one with the lower ``preference`` (p2p,
    hybrid with smaller groups first, alltoall, allgather). The chosen estimate's ``reason`` says why.

    Raises:
        ValueError: ``problem.cp == 1`` (nothing to choose), or no strategy is valid.
    """
    rows = strategy_estimates(problem, hardware, names)
    if not rows:
        raise ValueError("No CP strategy to choose with a CP degree of 1")
    valid = [r for r in rows if r.valid]
    if not valid:
        raise ValueError(
            "No CP strategy can serve this call: " + "; ".join(f"{r.label}: {r.reason}" for r in rows)
        )
    fastest = min(r.time_s for r in valid)
    best = min((r for r in valid if r.time_s <= fastest * (1 + TIE)), key=preference_key)
    others = sorted((r for r in valid if r is not best), key=lambda r: r.time_s)
    chosen = replace(best, reason=_why(best, others[0] if others else None, problem))
    return chosen, [chosen if r is best else r for r in rows]


@functools.lru_cache(maxsize=64)
def _choose(
    comm: str, heads: int, kv_heads: int, head_dim: int, seq_len: int, cp: int, tp: int, micro_batch: int,
    dtype_bytes: int, causal: bool, device: str, hardware: str,
) -> CommChoice:  # fmt: skip
    problem = AttentionProblem(
        heads, kv_heads, head_dim, seq_len, cp, tp=tp, micro_batch=micro_batch, dtype_bytes=dtype_bytes,
        grad_bytes=max(4, dtype_bytes), causal=causal,
    )  # fmt: skip
    hw = hardware_for_device(device, hardware)
    if comm == AUTO:
        best, rows = choose_strategy(problem, hw)
    else:  # a group strategy without a group size: its best size
        rows = strategy_estimates(problem, hw, (comm,))
        valid = [r for r in rows if r.valid]
        if not valid:
            raise ValueError(
                f"comm={comm!r} needs a group size that divides the CP degree {cp} and splits {heads} query "
                f"heads / {kv_heads} KV heads per rank; none does: "
                + "; ".join(f"k={r.a2a_size}: {r.reason}" for r in rows)
                + ". Use comm='p2p' or 'alltoall', or another CP degree."
            )
        fastest = min(valid, key=lambda r: r.time_s)
        best = replace(fastest, reason=f"{fastest.label}: the fastest group size")
    table = tuple(
        f"{r.label:<12} {r.time_s * 1e3:10.3f} ms ({r.compute_s * 1e3:.3f} compute + {r.exposed_s * 1e3:.3f} "
        f"exposed comm), {(r.forward_bytes + r.backward_bytes) / 2**20:,.1f} MiB sent"
        if r.valid
        else f"{r.label:<12} cannot run: {r.reason}"
        for r in rows
    )
    a2a = best.a2a_size if get_strategy(best.comm).takes_group_size else None
    return CommChoice(best.comm, a2a, best.reason + f" [{hw.name}]", table)


def choose_comm(
    comm: str,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seq_len: int,
    cp: int,
    tp: int = 1,
    micro_batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    causal: bool = True,
    device: torch.device | str = "cpu",
    hardware: str = "auto",
    a2a_size: int | None = None,
) -> CommChoice:
    """Resolve ``comm`` for one attention shape (Note [CP strategy cost] in ``cp_dtensor.cost.attention``).

    Named strategies come back as they are; ``"auto"`` is the cost model's choice among the registered
    strategies (every group size); a group strategy (``"hybrid"``) without ``a2a_size`` its best size.

    Args:
        comm: a registered strategy name or ``"auto"``.
        heads, kv_heads: query and key/value heads per rank (after any tp split).
        head_dim: head dimension.
        seq_len: global sequence length.
        cp: CP degree.
        tp: TP degree (tp ranks sit inside a cp group's span of devices).
        micro_batch: sequences per call.
        dtype: dtype of q, k, v.
        causal: causal (priced balanced) or bidirectional.
        device: where the attention runs (picks the hardware preset with ``hardware="auto"``).
        hardware: ``"auto"``, a preset name, or a calibration JSON (``scripts/plan.py --calibrate``).
        a2a_size: the group size the caller named (``hybrid``); must be None with ``auto``.

    Returns:
        The :class:`CommChoice`.
    """
    if comm != AUTO:
        strategy = get_strategy(comm)
        if not (strategy.takes_group_size and a2a_size is None):
            return CommChoice(comm, a2a_size)
    _refuse_auto_with_size(comm, a2a_size)
    if cp == 1:
        return CommChoice("p2p", None, "one CP rank: nothing to communicate")
    dtype_bytes = _DTYPE_BYTES.get(dtype, torch.tensor([], dtype=dtype).element_size())
    return _choose(
        comm, heads, kv_heads, head_dim, seq_len, cp, tp, micro_batch, dtype_bytes, causal, _device_key(device),
        hardware,
    )  # fmt: skip


def _refuse_auto_with_size(comm: str, a2a_size: int | None) -> None:
    """``comm="auto"`` chooses the group size itself: a caller's ``a2a_size`` is a contradiction."""
    if comm == AUTO and a2a_size is not None:
        raise ValueError(
            f"a2a_size={a2a_size} with comm='auto': the cost model chooses the group size; pass "
            f"comm='hybrid', a2a_size={a2a_size} to fix it."
        )


def _device_key(device: torch.device | str) -> str:
    """A hashable device name for the cache (``cuda`` -> ``cuda:0``)."""
    dev = torch.device(device)
    return f"cuda:{dev.index or 0}" if dev.type == "cuda" else str(dev)


def resolve_comm(
    comm: str,
    a2a_size: int | None,
    q: torch.Tensor,
    k: torch.Tensor,
    cp: int,
    is_causal: bool,
    hardware: str = "auto",
) -> tuple[str, int | None]:
    """``(comm, a2a_size)`` for one op call on local shards: ``auto`` resolved from the shapes (global
    length ``cp * S_local``; the cp group priced as consecutive devices); named strategies pass through.
    Runs eagerly (inside the custom op under torch.compile)."""
    if comm != AUTO:
        return comm, a2a_size
    _refuse_auto_with_size(comm, a2a_size)
    if cp == 1 or q.dim() != 4 or k.dim() != 4 or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        return "p2p", None  # nothing to choose; odd shapes fail the op's validation as usual
    b, hq, s_local, d = q.shape
    choice = _choose(
        comm, hq, k.shape[1], d, s_local * cp, cp, 1, b, q.element_size(), bool(is_causal), _device_key(q.device),
        hardware,
    )  # fmt: skip
    return choice.comm, choice.a2a_size
