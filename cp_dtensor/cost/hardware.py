"""Devices the cost model prices against: :class:`Hardware` and presets (H100, H200, A100, CPU)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "GIB",
    "HARDWARE_PRESETS",
    "Hardware",
    "build_hardware",
    "load_hardware_spec",
    "read_calibration_json",
    "replace_fields",
]

GIB = float(2**30)


def replace_fields(obj: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of the dataclass ``obj`` with some fields replaced; unknown keys raise naming the valid ones.

    Args:
        obj: A dataclass instance (:class:`Hardware`, ``CostOptions``).
        overrides: Field name to new value.

    Returns:
        The copy (its ``__post_init__`` validates the new values).
    """
    names = {f.name for f in fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown {type(obj).__name__} fields {unknown}; valid fields are {sorted(names)}")
    return replace(obj, **dict(overrides))


@dataclass(frozen=True)
class Hardware:
    """One device type and its interconnect.

    Attributes:
        name: Label for tables.
        memory_bytes: Device memory.
        peak_flops: Peak dense FLOP/s of one device in the compute dtype (bf16 on GPUs).
        matmul_efficiency: Achievable fraction of ``peak_flops`` for the linear layers (MFU-like).
        attention_efficiency: Achievable fraction of ``peak_flops`` for the attention kernels.
        intra_node_bandwidth: Bytes/s per direction per device within a node (NVLink).
        inter_node_bandwidth: Bytes/s per direction per device between nodes (one NIC per GPU).
        devices_per_node: Devices that share the intra-node link.
        intra_node_latency_s: Latency of one intra-node message.
        inter_node_latency_s: Latency of one inter-node message.
        memory_usable_fraction: Part of ``memory_bytes`` available to tensors (allocator, runtime, buffers).
        layer_overhead_s: Fixed time per block per pass (forward, backward, recompute): launch and Python
            overhead; 0 on GPUs. A calibrated CPU preset measures it beside the per-token part
            (``elementwise_bandwidth``).
        attention_backward_efficiency: Achievable fraction of ``peak_flops`` for the attention backward
            kernel, counting ``CostOptions.attention_backward_factor`` forwards of FLOPs (None: as
            ``attention_efficiency``).
        causal_attention_factor: Time per visible score element of a causal kernel call over that of an
            unmasked one (>= 1: the diagonal blocks compute masked elements too); the efficiencies above
            are those of unmasked calls.
        kernel_call_overhead_s: Fixed time of one attention kernel call, a forward or a backward (set-up of
            the CPU flash kernel; the ring calls it once per step, so CP pays it ``cp`` times per pass).
        elementwise_bandwidth: Bytes/s at which a block's elementwise work (norms, RoPE, SwiGLU, residuals,
            autograd bookkeeping) streams its activations: a forward costs its saved bytes over this, a
            backward twice that (None: free, as on GPUs where it hides behind the matmuls).
        comm_compute_bandwidth: Bytes/s (sent + received) at which a rank's own transfers take its compute
            time: gloo over loopback copies every byte through the kernel on the cores that compute, so a
            transfer "overlapped" with compute (CP ring, FSDP prefetch) still delays it; None: transfers
            use no compute (NCCL, RDMA).
        collective_bandwidth: Bytes/s of the ring all-gather / reduce-scatter formula (TP, FSDP) when it
            differs from the point-to-point ``*_node_bandwidth`` (gloo on CPU); None: the link's.
        collective_latency_s: Latency per ring step of a collective; None: the link's.
    """

    name: str
    memory_bytes: float
    peak_flops: float
    matmul_efficiency: float
    attention_efficiency: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    devices_per_node: int
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 1e-5
    memory_usable_fraction: float = 0.9
    layer_overhead_s: float = 0.0
    attention_backward_efficiency: float | None = None
    causal_attention_factor: float = 1.0
    kernel_call_overhead_s: float = 0.0
    elementwise_bandwidth: float | None = None
    comm_compute_bandwidth: float | None = None
    collective_bandwidth: float | None = None
    collective_latency_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "peak_flops", "intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Hardware.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("matmul_efficiency", "attention_efficiency", "memory_usable_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"Hardware.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ValueError(f"Hardware.devices_per_node must be an int >= 1, got {self.devices_per_node!r}")
        for name in (
            "intra_node_latency_s",
            "inter_node_latency_s",
            "layer_overhead_s",
            "kernel_call_overhead_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"Hardware.{name} must be >= 0, got {getattr(self, name)!r}")
        e_bwd = self.attention_backward_efficiency
        if e_bwd is not None and not 0 < e_bwd <= 1:
            raise ValueError(
                f"Hardware.attention_backward_efficiency must be in (0, 1] or None, got {e_bwd!r}"
            )
        if self.causal_attention_factor < 1:
            raise ValueError(
                f"Hardware.causal_attention_factor must be >= 1, got {self.causal_attention_factor!r}"
            )
        if self.elementwise_bandwidth is not None and not self.elementwise_bandwidth > 0:
            raise ValueError(
                f"Hardware.elementwise_bandwidth must be > 0 or None, got {self.elementwise_bandwidth!r}"
            )
        if self.comm_compute_bandwidth is not None and not self.comm_compute_bandwidth > 0:
            raise ValueError(
                f"Hardware.comm_compute_bandwidth must be > 0 or None, got {self.comm_compute_bandwidth!r}"
            )
        if self.collective_bandwidth is not None and not self.collective_bandwidth > 0:
            raise ValueError(
                f"Hardware.collective_bandwidth must be > 0 or None, got {self.collective_bandwidth!r}"
            )
        if self.collective_latency_s is not None and self.collective_latency_s < 0:
            raise ValueError(
                f"Hardware.collective_latency_s must be >= 0 or None, got {self.collective_latency_s!r}"
            )

    def with_overrides(self, overrides: Mapping[str, Any]) -> Hardware:
        """A copy with some fields replaced; unknown keys raise ``ValueError`` naming the valid ones."""
        return replace_fields(self, overrides)

    def link(self, span: int) -> tuple[float, float]:
        """``(bandwidth, latency)`` of a group whose ranks span ``span`` consecutive devices."""
        if span <= self.devices_per_node:
            return self.intra_node_bandwidth, self.intra_node_latency_s
        return self.inter_node_bandwidth, self.inter_node_latency_s

    def collective_link(self, span: int) -> tuple[float, float]:
        """``(bandwidth, latency)`` of the ring collective formula within ``span`` devices.

        Within a node ``collective_bandwidth`` / ``collective_latency_s`` replace the link's when set (a
        calibrated CPU preset: gloo's collectives run slower than its point-to-point messages).
        """
        bw, lat = self.link(span)
        if span > self.devices_per_node:
            return bw, lat
        if self.collective_bandwidth is not None:
            bw = self.collective_bandwidth
        if self.collective_latency_s is not None:
            lat = self.collective_latency_s
        return bw, lat

    @property
    def attention_backward_rate(self) -> float:
        """FLOP/s of the attention backward kernel."""
        e = (
            self.attention_efficiency
            if self.attention_backward_efficiency is None
            else self.attention_backward_efficiency
        )
        return self.peak_flops * e


HARDWARE_PRESETS: dict[str, Hardware] = {
    # H100 SXM (80 GiB; nvidia-smi shows 81559 MiB): 989 TFLOP/s dense bf16, NVLink4 450 GB/s per
    # direction, one 400 Gb/s NDR NIC (50 GB/s) per GPU.
    "h100": Hardware(
        name="h100",
        memory_bytes=80 * GIB,
        peak_flops=989e12,
        matmul_efficiency=0.6,
        attention_efficiency=0.45,
        intra_node_bandwidth=450e9,
        inter_node_bandwidth=50e9,
        devices_per_node=8,
    ),
    # A100 SXM 80 GB: 312 TFLOP/s bf16, NVLink3 300 GB/s per direction, 200 Gb/s HDR per GPU.
    "a100": Hardware(
        name="a100",
        memory_bytes=80 * GIB,
        peak_flops=312e12,
        matmul_efficiency=0.6,
        attention_efficiency=0.45,
        intra_node_bandwidth=300e9,
        inter_node_bandwidth=25e9,
        devices_per_node=8,
        inter_node_latency_s=1.5e-5,
    ),
    # A CPU "device" is one gloo rank of a local run. Measured here (torch 2.13 CPU, one thread): fp32
    # matmul ~80 GFLOP/s, SDPA flash forward ~47 GFLOP/s. The preset is a rank of 4 ranks sharing 2 cores
    # (half a core each: 50 GFLOP/s "peak"); loopback gloo. Rough guesses: `scripts/plan.py --calibrate`
    # measures a machine into a preset file that replaces them (--hw calib.json).
    "cpu": Hardware(
        name="cpu",
        memory_bytes=8 * GIB,
        peak_flops=5e10,
        matmul_efficiency=0.8,
        attention_efficiency=0.45,
        intra_node_bandwidth=1e9,
        inter_node_bandwidth=1e9,
        devices_per_node=64,
        intra_node_latency_s=1e-4,
        inter_node_latency_s=1e-4,
        memory_usable_fraction=0.8,
        layer_overhead_s=2e-3,
    ),
}
# H200: the H100's compute and links with 141 GB of HBM3e (140 GiB counted).
HARDWARE_PRESETS["h200"] = replace(HARDWARE_PRESETS["h100"], name="h200", memory_bytes=140 * GIB)


def build_hardware(name: str, overrides: Mapping[str, Any] | None = None) -> Hardware:
    """A preset from ``HARDWARE_PRESETS`` (``h100``, ``h200``, ``a100``, ``cpu``), optionally overridden.

    Args:
        name: Case-insensitive preset name.
        overrides: :class:`Hardware` field overrides (e.g. from a calibration file or ``--hw-set``).

    Returns:
        The device description.
    """
    if name.lower() not in HARDWARE_PRESETS:
        raise ValueError(f"Unknown hardware {name!r}; choose from {sorted(HARDWARE_PRESETS)}")
    hw = HARDWARE_PRESETS[name.lower()]
    return hw.with_overrides(overrides) if overrides else hw


def load_hardware_spec(spec: str) -> Hardware:
    """The :class:`Hardware` a setting names: a preset (``h100``, ``h200``, ``a100``, ``cpu``) or a calibration
    JSON written by ``scripts/plan.py --calibrate`` (its ``preset``, default ``cpu``, and ``hardware`` overrides).

    Raises:
        ValueError: naming the preset list, or the file and the key that is wrong.
    """
    text = str(spec)
    if text.lower() in HARDWARE_PRESETS:
        return build_hardware(text)
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"Unknown hardware {text!r}: not a preset ({sorted(HARDWARE_PRESETS)}) and no such cost-model "
            f"calibration file; write one with `scripts/plan.py --calibrate --out {text}`."
        )
    data = read_calibration_json(path)
    preset = data.get("preset", "cpu")
    overrides = data.get("hardware", {})
    if not isinstance(preset, str) or preset.lower() not in HARDWARE_PRESETS:
        raise ValueError(f"{path}: 'preset' must be one of {sorted(HARDWARE_PRESETS)}, got {preset!r}.")
    if not isinstance(overrides, dict):
        raise ValueError(
            f"{path}: 'hardware' must be an object of Hardware fields, got {type(overrides).__name__}."
        )
    try:
        return build_hardware(preset, overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: key 'hardware': {e}") from None


def read_calibration_json(path: str | Path) -> dict[str, Any]:
    """The top-level object of a calibration JSON file; ``ValueError`` naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}.")
    return data
