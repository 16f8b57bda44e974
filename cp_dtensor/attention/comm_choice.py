"""``comm="auto"``: the CP communication strategy chosen per call shape by the cost model.

The op's callers name a strategy (``p2p``, ``allgather``, ``alltoall``, ``hybrid``) or ask for ``auto``.
``auto`` is resolved once per shape from the heads, KV heads, head dim, sequence length, CP degree, dtype,
mask and a hardware description, by the planner's Note [CP strategy cost]
(``cp_dtensor.tools.planner.cp_strategy``, imported only when ``auto`` is used). Every rank resolves the
same shapes with the same preset, so all ranks pick the same strategy (the cross-rank check would name a
mismatch). ``hybrid`` without a group size is resolved the same way among the hybrid group sizes.

Hardware: ``"auto"`` takes the preset of the device (CPU: ``cpu``; CUDA: ``h200`` / ``h100`` / ``a100`` by
device name, else ``h100``, with torchrun's ``LOCAL_WORLD_SIZE`` as the GPUs per node); a preset name or a
calibration JSON written by ``scripts/plan.py --calibrate`` replaces it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

__all__ = ["CommChoice", "choose_comm", "hardware_for_device", "resolve_comm"]

_DTYPE_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class CommChoice:
    """A resolved strategy: ``comm`` and ``a2a_size`` to pass to the op, and why.

    Attributes:
        comm: ``"p2p"``, ``"allgather"``, ``"alltoall"`` or ``"hybrid"``.
        a2a_size: Ranks per all-to-all group for ``hybrid``; None otherwise.
        reason: One sentence on why (empty when the caller named the strategy).
        table: One line per strategy with its predicted time per layer (empty when named).
    """

    comm: str
    a2a_size: int | None
    reason: str = ""
    table: tuple[str, ...] = ()


def hardware_for_device(device: torch.device | str, hardware: str = "auto"):  # -> planner Hardware
    """The planner's :class:`Hardware` for ``device``: a preset by device (``hardware="auto"``), a preset
    name (``h100``, ``h200``, ``a100``, ``cpu``) or a calibration JSON path."""
    from cp_dtensor.tools.planner import build_hardware, load_hardware

    if hardware != "auto":
        return load_hardware(hardware)[0]
    device = torch.device(device)
    if device.type != "cuda":
        return build_hardware("cpu")
    name = torch.cuda.get_device_name(device).upper()
    preset = build_hardware(next((p for p in ("h200", "h100", "a100") if p.upper() in name), "h100"))
    per_node = os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun: the processes (GPUs) of this node
    if per_node.isdigit() and int(per_node) > 0:
        preset = preset.with_overrides({"devices_per_node": int(per_node)})
    return preset


@functools.lru_cache(maxsize=64)
def _choose(
    comm: str, heads: int, kv_heads: int, head_dim: int, seq_len: int, cp: int, tp: int, micro_batch: int,
    dtype_bytes: int, causal: bool, device: str, hardware: str,
) -> CommChoice:  # fmt: skip
    from cp_dtensor.tools.planner.cp_strategy import AttentionProblem, choose_strategy, strategy_estimates

    problem = AttentionProblem(
        heads, kv_heads, head_dim, seq_len, cp, tp=tp, micro_batch=micro_batch, dtype_bytes=dtype_bytes,
        grad_bytes=max(4, dtype_bytes), causal=causal,
    )  # fmt: skip
    hw = hardware_for_device(device, hardware)
    if comm == "auto":
        best, rows = choose_strategy(problem, hw)
    else:  # "hybrid" without a group size: the best hybrid
        rows = strategy_estimates(problem, hw)
        hybrids = [r for r in rows if r.comm == "hybrid" and r.valid]
        if not hybrids:
            raise ValueError(
                f"comm='hybrid' needs a group size that divides the CP degree {cp} (1 < k < {cp}) and splits "
                f"{heads} query heads / {kv_heads} KV heads per rank; none does: "
                + "; ".join(f"k={r.a2a_size}: {r.reason}" for r in rows if r.comm == "hybrid")
                + ". Use comm='p2p' or 'alltoall', or another CP degree."
            )
        fastest = min(hybrids, key=lambda r: r.time_s)
        best = replace(fastest, reason=f"{fastest.label}: the fastest group size")
    table = tuple(
        f"{r.label:<12} {r.time_s * 1e3:10.3f} ms ({r.compute_s * 1e3:.3f} compute + {r.exposed_s * 1e3:.3f} "
        f"exposed comm), {(r.forward_bytes + r.backward_bytes) / 2**20:,.1f} MiB sent"
        if r.valid
        else f"{r.label:<12} cannot run: {r.reason}"
        for r in rows
    )
    a2a = best.a2a_size if best.comm == "hybrid" else None
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
    """Resolve ``comm`` for one attention shape (Note [CP strategy cost] in the planner).

    Named strategies come back as they are; ``"auto"`` is the cost model's choice among p2p, allgather,
    alltoall and hybrid (every group size); ``"hybrid"`` without ``a2a_size`` its best group size.

    Args:
        comm: ``"p2p"``, ``"allgather"``, ``"alltoall"``, ``"hybrid"`` or ``"auto"``.
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
    if comm not in ("auto", "hybrid") or (comm == "hybrid" and a2a_size is not None):
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
    if comm == "auto" and a2a_size is not None:
        raise ValueError(
            f"a2a_size={a2a_size} with comm='auto': the cost model chooses the group size; pass "
            f"comm='hybrid', a2a_size={a2a_size} to fix it."
        )


def _device_key(device: torch.device | str) -> str:
    """A hashable device name for the cache (``cuda`` -> ``cuda:0``)."""
    dev = torch.device(device)
    return f"cuda:{dev.index or 0}" if dev.type == "cuda" else str(dev)


@torch.compiler.assume_constant_result
def _resolve_constant(
    heads: int, kv_heads: int, head_dim: int, seq_len: int, cp: int, micro_batch: int, dtype_bytes: int,
    causal: bool, device: str,
) -> tuple[str, int]:  # fmt: skip
    """The op's ``auto`` choice as plain constants (traced once under torch.compile)."""
    choice = _choose(
        "auto", heads, kv_heads, head_dim, seq_len, cp, 1, micro_batch, dtype_bytes, causal, device, "auto"
    )
    return choice.comm, choice.a2a_size or 0


def resolve_comm(
    comm: str, a2a_size: int | None, q: torch.Tensor, k: torch.Tensor, cp: int, is_causal: bool
) -> tuple[str, int | None]:
    """``(comm, a2a_size)`` for one op call: ``auto`` resolved from the local shards' shapes (global
    length ``cp * S_local``; the cp group priced as consecutive devices); other modes pass through."""
    if comm != "auto":
        return comm, a2a_size
    _refuse_auto_with_size(comm, a2a_size)
    if cp == 1 or q.dim() != 4 or k.dim() != 4 or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        return "p2p", None  # nothing to choose; odd shapes fail the op's validation as usual
    b, hq, s_local, d = q.shape
    name, size = _resolve_constant(
        hq, k.shape[1], d, s_local * cp, cp, b, q.element_size(), bool(is_causal), _device_key(q.device)
    )
    return name, size or None
