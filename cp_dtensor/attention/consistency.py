"""Cross-rank consistency of CP attention calls: verified once per call signature, then free.

Note [Cross-rank call check]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every rank of a CP group must make the same attention call: the same layout, mask, comm mode, scale,
shapes and dtype. A rank that differs computes garbage without an error (a different layout or mask) or
hangs the group (a different comm mode, a different sequence length). So the first time a rank sees a
call signature it checks it with the group, and caches the verdict::

    rank r:  sig = (layout, is_causal, comm, a2a_size, scale, shapes, dtype, device, backend, mask:
                    window and a hash of the document ids), error = local check
             sig in verified[group]?  -> yes: nothing to do (steady state: no communication)
                                      -> no:  all_gather_object((sig, error)) over the CP group
                                              any error?        raise the first failing rank's message
                                              signatures equal? cache sig; else raise naming each field
                                                                that differs and each rank's value

Because a rank that fails its local validation still joins the gather (with its message), its peers
fail fast with that message instead of waiting in the ring. Signatures include everything the local
validation checks, so a cached signature is always valid on this rank. Limit: a rank that changes its
call *after* the others have cached theirs is not caught (it would wait in the gather while they run the
ring); every rank of a training step calls the same sequence of signatures, so that takes a rank-dependent
bug introduced mid-run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

__all__ = ["CallSignature", "verify_call_across_ranks"]

# Verified signatures per process group (keyed by group name: ProcessGroup objects are not weak-referenceable).
# A cache of facts, never an option: it changes no result, only skips a repeated check.
_VERIFIED: dict[str, set[CallSignature]] = {}


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


def verify_call_across_ranks(
    group: dist.ProcessGroup, signature: CallSignature, error: Exception | None
) -> None:
    """Check ``signature`` against the other ranks of ``group`` (Note [Cross-rank call check]).

    Args:
        group: the CP process group.
        signature: this rank's call signature.
        error: this rank's local validation error, or None.

    Raises:
        ValueError: on every rank, when any rank's validation failed (that rank's message) or the
            signatures differ (each differing field with every rank's value).
    """
    verified = _VERIFIED.setdefault(group.group_name, set())
    if error is None and signature in verified:
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
    if any(s != signature for s in signatures):
        raise ValueError(
            f"CP attention calls differ across the ranks of the CP group: {_describe_mismatch(signatures)}. "
            f"Every CP rank must make the same call (same layout, mask, comm, scale, shapes and dtype)."
        )
    verified.add(signature)
