"""Predicted against measured: read a calibration file (Note [Calibration file]) and state the model's error.

``scripts/bench_train.py`` writes such files from real CPU runs; ``scripts/plan.py --calibrate-from``
reads them and prints :func:`compare_measurements`. ``scripts/plan.py --calibrate`` writes one with no
measurements, a calibrated hardware preset (``measure.py``, Note [Machine calibration]); :func:`load_hardware`
turns a preset name or such a file into a :class:`~.hardware.Hardware` (``--hw calib.json``).

Note [Calibration file]
~~~~~~~~~~~~~~~~~~~~~~~
A JSON object; every key but ``measurements`` is optional::

    {
      "model": "small",                         # ModelShape name (see build_model_shape)
      "seq_len": 4096, "micro_batch": 1,        # defaults for the rows
      "preset": "cpu",                          # the HARDWARE_PRESETS entry "hardware" overrides
      "hardware": {"peak_flops": 4e10, ...},    # overrides of Hardware fields
      "machine": {...},                         # free-form: how the hardware fields were measured
      "options": {"dtype_bytes": 4, ...},       # overrides of CostOptions fields
      "measurements": [                         # optional (none in a calibrated preset)
        {"layout": {"tp": 4, "cp": 1, "pp": 1, "dp": 1, "ac": "full"},   # or "tp4+full"
         "step_time_s": 1.25, "activation_bytes": 123456789,   # either may be null / missing
         "seq_len": 4096, "micro_batch": 1, "microbatches": 1}  # optional per-row overrides
      ]
    }

``preset`` names the base of the ``hardware`` overrides when the file is used as ``--hw FILE`` (default
``cpu``); with ``--hw NAME --calibrate-from FILE`` the overrides apply to ``NAME``.

A row's ``"layout"`` is a :class:`~.parallel_plan.ParallelPlan` (its degrees and AC mode; the key keeps
its first name so that existing result files stay readable).

``activation_bytes`` is the bytes of distinct storages autograd saves in forward + loss on the largest
rank, *parameters excluded*. Note that ``F.linear`` saves ``weight.t()``, a view that is not an
``nn.Parameter``: a counter that skips only ``nn.Parameter`` instances also counts every weight once;
:func:`cp_dtensor.memory.count_saved_tensors` skips parameters and their views. The prediction includes the
fp32 log-softmax of the loss. :func:`compare_measurements` reports ``(predicted - measured) / measured``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cp_dtensor.cost.hardware import HARDWARE_PRESETS, Hardware, build_hardware, read_calibration_json
from cp_dtensor.tools.planner.options import CostOptions
from cp_dtensor.tools.planner.parallel_plan import ParallelPlan
from cp_dtensor.tools.planner.shapes import ModelShape
from cp_dtensor.tools.planner.step_estimate import Estimate, estimate

__all__ = [
    "Calibration",
    "Comparison",
    "Measurement",
    "compare_measurements",
    "load_calibration",
    "load_hardware",
]


@dataclass(frozen=True)
class Measurement:
    """One measured plan (Note [Calibration file]).

    Attributes:
        plan: Degrees and AC mode.
        step_time_s: Measured step time (None if not measured).
        activation_bytes: Measured bytes saved for backward on the largest rank (None if not measured).
        seq_len: Global sequence length of the run.
        micro_batch: Sequences per micro-batch.
        microbatches: Micro-batches per step per DP replica.
    """

    plan: ParallelPlan
    step_time_s: float | None
    activation_bytes: float | None
    seq_len: int
    micro_batch: int = 1
    microbatches: int = 1


@dataclass(frozen=True)
class Calibration:
    """A parsed calibration file.

    Attributes:
        model: Model name in the file ("" if absent).
        hardware_overrides: ``Hardware`` field overrides.
        options_overrides: ``CostOptions`` field overrides.
        measurements: Measured rows.
        preset: Base preset of ``hardware_overrides`` ("" if absent).
        machine: How the hardware fields were measured (free-form; empty if absent).
    """

    model: str
    hardware_overrides: dict[str, Any]
    options_overrides: dict[str, Any]
    measurements: list[Measurement]
    preset: str = ""
    machine: dict[str, Any] = field(default_factory=dict)

    def build_hardware(self, default_preset: str = "cpu") -> Hardware:
        """The file's preset (or ``default_preset``) with the file's overrides."""
        return build_hardware(self.preset or default_preset, self.hardware_overrides)


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration JSON file (Note [Calibration file]); errors name the offending key.

    Args:
        path: The file.

    Returns:
        The parsed file (overrides are applied by the caller, e.g. :func:`~.hardware.build_hardware`).
    """
    data = read_calibration_json(path)
    known = {"model", "seq_len", "micro_batch", "preset", "hardware", "options", "machine", "measurements"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; expected {sorted(known)}")
    rows: list[Measurement] = []
    for i, row in enumerate(data.get("measurements", [])):
        if "layout" not in row:
            raise ValueError(f"{path}: measurements[{i}] has no 'layout'")
        seq_len = row.get("seq_len", data.get("seq_len"))
        if seq_len is None:
            raise ValueError(f"{path}: measurements[{i}] needs 'seq_len' (or a top-level 'seq_len')")
        plan = row["layout"]
        rows.append(
            Measurement(
                plan=ParallelPlan.parse(plan) if isinstance(plan, str) else ParallelPlan.from_dict(plan),
                step_time_s=row.get("step_time_s"),
                activation_bytes=row.get("activation_bytes"),
                seq_len=int(seq_len),
                micro_batch=int(row.get("micro_batch", data.get("micro_batch", 1))),
                microbatches=int(row.get("microbatches", 1)),
            )
        )
    return Calibration(
        model=str(data.get("model", "")),
        hardware_overrides=dict(data.get("hardware", {})),
        options_overrides=dict(data.get("options", {})),
        measurements=rows,
        preset=str(data.get("preset", "")),
        machine=dict(data.get("machine", {})),
    )


def load_hardware(spec: str | Path) -> tuple[Hardware, Calibration | None]:
    """A hardware preset by name (``h100``, ``cpu``, ...) or from a calibration file (``calib.json``).

    Args:
        spec: A :data:`~.hardware.HARDWARE_PRESETS` name, or the path of a JSON calibration file (Note
            [Calibration file]) whose ``preset`` (default ``cpu``) and ``hardware`` overrides give the device.

    Returns:
        ``(hardware, calibration)``; ``calibration`` is None for a preset name (the caller applies its
        ``options`` overrides).
    """
    text = str(spec)
    if text.lower() in HARDWARE_PRESETS:
        return build_hardware(text), None
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"Unknown hardware {text!r}: not a preset ({sorted(HARDWARE_PRESETS)}) and no such calibration "
            f"file; write one with `scripts/plan.py --calibrate --out {text}`"
        )
    calibration = load_calibration(path)
    return calibration.build_hardware(), calibration


@dataclass(frozen=True)
class Comparison:
    """Predicted vs measured for one plan.

    Attributes:
        measurement: The measured row.
        estimate: The prediction.
        step_time_error: ``(predicted - measured) / measured`` (None when not measured).
        activation_error: The same for activation bytes.
    """

    measurement: Measurement
    estimate: Estimate
    step_time_error: float | None
    activation_error: float | None


def _rel_error(predicted: float, measured: float | None) -> float | None:
    if measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured


def compare_measurements(
    model: ModelShape, measurements: Iterable[Measurement], hardware: Hardware, options: CostOptions
) -> list[Comparison]:
    """Predict every measured plan and return the relative errors.

    Args:
        model: Model shape.
        measurements: Measured rows (e.g. ``load_calibration(path).measurements``).
        hardware: Device and links (with the file's overrides applied).
        options: Implementation choices (with the file's overrides applied).

    Returns:
        One comparison per measurement, in order.
    """
    out = []
    for meas in measurements:
        est = estimate(
            model,
            meas.plan,
            meas.seq_len,
            hardware,
            options,
            micro_batch=meas.micro_batch,
            microbatches=meas.microbatches,
        )
        out.append(
            Comparison(
                measurement=meas,
                estimate=est,
                step_time_error=_rel_error(est.step_time_s, meas.step_time_s),
                activation_error=_rel_error(est.activation_bytes, meas.activation_bytes),
            )
        )
    return out
