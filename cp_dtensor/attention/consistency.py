"""Cross-rank consistency of CP attention calls: every call checked with one fixed-size collective.

Note [Cross-rank call check]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every rank of a CP group must make the same attention call: the same layout, mask, strategy, scale,
shapes and dtype. A rank that differs computes garbage without an error (a different layout or mask) or
hangs the group (a different strategy, a different sequence length). So every call, on every rank, joins
one small collective *before* any of the call's communication::

    rank r:  sig = (layout, is_causal, comm, a2a_size, scale, shapes, dtype, device, backend,
                    mask: window and the digest of the document ids)
             h = 64-bit hash of sig;  err = 1 if the local validation failed
             all_reduce(MAX, [h_hi, h_lo, -h_hi, -h_lo, err])       5 int64, the same on every rank
             max == min and no err  -> run the call
             otherwise (every rank sees the same reduced values, so every rank takes this branch):
                 all_gather_object((sig, error message)) and raise on every rank, naming the failing
                 rank's message or each field that differs with every rank's value

Whether the check runs never depends on what a rank has seen before, so a rank that changes its mask
when the others repeat theirs raises instead of hanging. Because a rank that fails its local validation
still joins the collective, its peers fail fast with its message instead of waiting in the ring. Cost:
one 40-byte all-reduce per call (backward needs none: it replays the forward's verified call), measured
in docs/performance.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

__all__ = ["CallSignature", "verify_call_across_ranks"]


@dataclass(frozen=True)
class CallSignature:
    """What every CP rank's call of one attention op must agree on."""

    layout: str
    is_causal: bool
    comm: str
    scale: float | None
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: str
    device_type: str
    backend: str | None
    mask: tuple = ()
    a2a_size: int | None = None

    @classmethod
    def of(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: str,
        is_causal: bool,
        comm: str,
        scale: float | None,
        backend: str | None,
        mask: tuple = (),
        a2a_size: int | None = None,
    ) -> CallSignature:
        """The signature of one call on this rank."""
        return cls(
            layout=str(layout),
            is_causal=bool(is_causal),
            comm=str(comm),
            scale=None if scale is None else float(scale),
            q_shape=tuple(q.shape),
            k_shape=tuple(k.shape),
            v_shape=tuple(v.shape),
            dtype=str(q.dtype).removeprefix("torch."),
            device_type=q.device.type,
            backend=backend,
            mask=mask,
            a2a_size=a2a_size,
        )


def _describe_mismatch(signatures: list[CallSignature]) -> str:
    fields = asdict(signatures[0]).keys()
    parts = []
    for name in fields:
        values = [getattr(s, name) for s in signatures]
        if len(set(map(repr, values))) > 1:
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            parts.append(f"{name} ({per_rank})")
    return "; ".join(parts)


def _hash_words(signature: CallSignature) -> list[int]:
    """Two non-negative 62-bit words of a process-independent hash of ``signature``."""
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=16).digest()
    mask = (1 << 62) - 1
    return [int.from_bytes(digest[:8], "little") & mask, int.from_bytes(digest[8:], "little") & mask]


def verify_call_across_ranks(
    group: dist.ProcessGroup,
    signature: CallSignature,
    error: Exception | None,
    device: torch.device | None = None,
) -> None:
    """Check ``signature`` against the other ranks of ``group`` (Note [Cross-rank call check]).

    Args:
        group: the CP process group.
        signature: this rank's call signature.
        error: this rank's local validation error, or None.
        device: where the collective's small tensor lives (the call's device; CPU by default).

    Raises:
        ValueError: on every rank, when any rank's validation failed (that rank's message) or the
            signatures differ (each differing field with every rank's value).
    """
    hi, lo = _hash_words(signature)
    flags = torch.tensor([hi, lo, -hi, -lo, int(error is not None)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    max_hi, max_lo, neg_min_hi, neg_min_lo, any_error = flags.tolist()
    if not any_error and max_hi == -neg_min_hi and max_lo == -neg_min_lo:
        return
    gathered: list[tuple[CallSignature, str | None] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (signature, None if error is None else str(error)), group=group)
    for rank, item in enumerate(gathered):
        assert item is not None
        if item[1] is not None:
            if error is not None:
                raise error
            raise ValueError(f"CP attention failed on rank {rank} of the CP group: {item[1]}")
    signatures = [item[0] for item in gathered if item is not None]
    raise ValueError(
        f"CP attention calls differ across the ranks of the CP group: {_describe_mismatch(signatures)}. "
        f"Every CP rank must make the same call (same layout, mask, comm, scale, shapes and dtype)."
    )
