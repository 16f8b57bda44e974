"""The implementations under test: cp_dtensor's ring, PyTorch's ring loop, single-process SDPA.

In table order::

  cpd_p2p_zigzag        cp_dtensor.ring_attention(comm="p2p", layout="zigzag")
  cpd_allgather_zigzag  cp_dtensor.ring_attention(comm="allgather", layout="zigzag")
  cpd_p2p_contiguous    cp_dtensor.ring_attention(comm="p2p", layout="contiguous")
  torch_ring_alltoall   PyTorch's ring loop (head-tail balancing when causal), all-to-all rotater
  torch_ring_allgather  the same with the all-gather rotater
  sdpa_1thread          F.scaled_dot_product_attention on the full sequence, 1 thread (efficiency baseline)
  sdpa_cp_threads       the same with CP threads
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALL_VARIANT_NAMES", "CP_KINDS", "Variant", "build_variants"]

CP_KINDS = ("cpd", "torch")  # the kinds that run on CP ranks (not single-process SDPA)


@dataclass(frozen=True)
class Variant:
    """One benchmarked implementation.

    Attributes:
        name: key in tables and JSON.
        label: human description.
        kind: ``"cpd"`` (cp_dtensor), ``"torch"`` (PyTorch's ring loop) or ``"sdpa"`` (single process).
        layout: sequence layout of the CP inputs (zigzag == head-tail round robin).
        comm: ``p2p``/``allgather`` for cp_dtensor, ``alltoall``/``allgather`` for PyTorch's rotaters.
        threads: intra-op threads of a single-process variant.
    """

    name: str
    label: str
    kind: str
    layout: str = "zigzag"
    comm: str = ""
    threads: int = 1


def build_variants(cp: int, causal: bool) -> list[Variant]:
    """Every variant of one run, in table order."""
    torch_layout = "zigzag" if causal else "contiguous"  # PyTorch balances only causal attention
    balance = "head-tail" if causal else "no balancing"
    return [
        Variant("cpd_p2p_zigzag", "cp_dtensor p2p ring, zigzag", "cpd", "zigzag", "p2p"),
        Variant("cpd_allgather_zigzag", "cp_dtensor all-gather, zigzag", "cpd", "zigzag", "allgather"),
        Variant("cpd_p2p_contiguous", "cp_dtensor p2p ring, contiguous", "cpd", "contiguous", "p2p"),
        Variant(
            "torch_ring_alltoall",
            f"PyTorch ring loop, {balance}, all-to-all",
            "torch",
            torch_layout,
            "alltoall",
        ),
        Variant(
            "torch_ring_allgather",
            f"PyTorch ring loop, {balance}, all-gather",
            "torch",
            torch_layout,
            "allgather",
        ),
        Variant("sdpa_1thread", "single-process SDPA, 1 thread", "sdpa", threads=1),
        Variant("sdpa_cp_threads", f"single-process SDPA, {cp} threads", "sdpa", threads=cp),
    ]


ALL_VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in build_variants(2, True))
