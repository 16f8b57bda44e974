"""One settings object for CP attention: layout, strategy and its group size, kernel backend, cost hardware,
piece packing.

Built once (by the user, the trainer from its config, or the torchtitan integration) and passed whole to
the styles, the mode, ``parallelize`` and the op; the mask (causal, documents, window) is the other value a
call needs (:class:`~cp_dtensor.attention.mask.AttentionMask`). Everything a setting can get wrong without
knowing the CP degree is refused here, once, with the fix; the rest (a group size that must divide cp,
heads that must split) when the first call knows the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cp_dtensor.attention.kernels import KERNELS
from cp_dtensor.attention.packing import PIECE_PACKING
from cp_dtensor.attention.stats import AttentionStats
from cp_dtensor.attention.strategy import AUTO, get_strategy
from cp_dtensor.layout import LayoutLike, LayoutRule, validate_layout

__all__ = ["CPSettings"]


@dataclass(frozen=True)
class CPSettings:
    """How CP attention runs.

    Attributes:
        layout: where each rank's tokens sit: ``"zigzag"``, ``"contiguous"``, a layout object from
            :func:`cp_dtensor.balanced_layout`, or a layout *rule* (:class:`cp_dtensor.BalancedLayoutRule`)
            that gives each batch its layout from its document ids. None: ``"zigzag"`` for local shards,
            natural order (``"contiguous"``) for DTensors.
        comm: the strategy: ``"p2p"`` (ring), ``"allgather"``, ``"alltoall"`` (Ulysses), ``"hybrid"``, any
            registered one (``cp_dtensor.register_strategy``), or ``"auto"`` (the cost model's choice per
            call shape).
        a2a_size: ranks per all-to-all group, required by ``"hybrid"`` (a divisor of the CP degree).
        backend: kernel adapter (``cpu_flash``, ``flash``, ``cudnn``, ``efficient``, ``math``); None: chosen
            from device and dtype.
        cost_hardware: what ``comm="auto"`` prices against: ``"auto"`` (by device), a preset name (``h100``,
            ``h200``, ``a100``, ``cpu``) or a calibration JSON from ``scripts/plan.py --calibrate``.
        piece_packing: how the kernels run a ring step's pieces (Note [Piece packing]): ``"packed"`` (one
            varlen call per mask class), ``"per_piece"`` (one call per piece) or ``"auto"`` (per piece: on CPU as
            measured, on CUDA until the flash varlen path has passed scripts/check_cuda.sh on a GPU; pass
            ``"packed"`` to opt in there). The
            results agree up to the order of fp32 sums; the bytes sent are the same.
        stats: optional :class:`~cp_dtensor.AttentionStats` that every call adds its bytes and work to (an
            observer, not a setting: it does not take part in equality).
    """

    layout: LayoutLike | LayoutRule | None = None
    comm: str = "p2p"
    a2a_size: int | None = None
    backend: str | None = None
    cost_hardware: str = "auto"
    piece_packing: str = "auto"
    stats: AttentionStats | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layout is not None and not isinstance(self.layout, LayoutRule):
            validate_layout(self.layout)
        if self.comm != AUTO:
            problem = get_strategy(self.comm).check_group_size(self.a2a_size, None)
            if problem:
                raise ValueError(problem)
        elif self.a2a_size is not None:
            raise ValueError(
                f"a2a_size={self.a2a_size} with comm='auto': the cost model chooses the group size; pass "
                f"comm='hybrid', a2a_size={self.a2a_size} to fix it."
            )
        if self.backend is not None and self.backend not in KERNELS:
            raise ValueError(
                f"Unknown attention kernel backend {self.backend!r}; expected one of {sorted(KERNELS)} or None "
                f"(chosen from device and dtype)."
            )
        if self.piece_packing not in PIECE_PACKING:
            raise ValueError(
                f'piece_packing must be one of {PIECE_PACKING}, got {self.piece_packing!r} ("auto": packed '
                f"varlen calls where the kernel has them, one call per piece otherwise)."
            )
        if not isinstance(self.cost_hardware, str) or not self.cost_hardware:
            raise ValueError(
                f"cost_hardware must be 'auto', a preset name or a file path, got {self.cost_hardware!r}."
            )

    def with_options(self, **changes: Any) -> CPSettings:
        """A copy with some fields changed (validated again)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return CPSettings(**values)

    def check_cp(self, cp: int) -> None:
        """Raise ``ValueError`` when a setting does not fit ``cp`` ranks (the group size must divide it)."""
        if self.comm != AUTO:
            problem = get_strategy(self.comm).check_group_size(self.a2a_size, cp)
            if problem:
                raise ValueError(problem)
