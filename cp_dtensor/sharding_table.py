"""Sharding inspection: what every module's forward really receives and returns, and its parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten

__all__ = ["ModuleRecord", "TensorRecord", "format_sharding_table", "inspect_sharding"]


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as a module saw it."""

    name: str
    is_dtensor: bool
    placements: tuple[str, ...]  # str(placement): "S(1)" = Shard(1), "R" = Replicate, "P(sum)" = Partial
    mesh_axes: tuple[str, ...]
    local_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: str

    def placement_on(self, axis: str) -> str | None:
        """The placement on mesh axis ``axis`` (``"S(1)"`` = Shard(1), ``"R"`` = Replicate), or None."""
        if axis not in self.mesh_axes:
            return None
        return self.placements[self.mesh_axes.index(axis)]

    def short(self) -> str:
        """Compact text: ``[cp:S(1) tp:R] (2, 64, 64)/(2, 128, 64)`` or ``local (2, 64, 64)``."""
        if not self.is_dtensor:
            return f"local {self.local_shape}"
        pl = " ".join(f"{a}:{p}" for a, p in zip(self.mesh_axes, self.placements))
        return f"[{pl}] {self.local_shape}/{self.global_shape}"


@dataclass
class ModuleRecord:
    """Inputs, outputs and own parameters of one module during one forward.

    ``inputs`` are the tensors as the caller passed them; ``forward_inputs`` as ``forward`` received them,
    after the module's pre-hooks (a parallel style's input conversion, e.g. DTensor -> local shard).
    """

    name: str
    type: str
    inputs: list[TensorRecord] = field(default_factory=list)
    forward_inputs: list[TensorRecord] = field(default_factory=list)
    outputs: list[TensorRecord] = field(default_factory=list)
    params: list[TensorRecord] = field(default_factory=list)
    calls: int = 0


def _record(name: str, t: torch.Tensor) -> TensorRecord:
    if isinstance(t, DTensor):
        mesh = t.device_mesh
        return TensorRecord(
            name=name,
            is_dtensor=True,
            placements=tuple(str(p) for p in t.placements),
            mesh_axes=tuple(mesh.mesh_dim_names or (f"dim{i}" for i in range(mesh.ndim))),
            local_shape=tuple(t.to_local().shape),
            global_shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
        )
    return TensorRecord(
        name, False, (), (), tuple(t.shape), tuple(t.shape), str(t.dtype).removeprefix("torch.")
    )


def _tensors(obj: Any, prefix: str) -> list[TensorRecord]:
    leaves, _ = tree_flatten(obj)
    return [_record(f"{prefix}{i}", x) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]


def inspect_sharding(model: nn.Module, *inputs: Any, **kwargs: Any) -> list[ModuleRecord]:
    """Run one forward (no grad) and record, per module, the tensors its forward saw.

    Inputs are recorded twice: before every pre-hook installed on the module (what the caller passed)
    and after them (what ``forward`` really receives); outputs after every forward hook (what the caller
    gets). So a style's conversions show at the module boundary. Parameters are the module's
    own (non-recursive) ones as stored between steps (e.g. FSDP-sharded), recorded before the forward.
    A collective like the forward itself: call on every rank.

    Returns:
        One :class:`ModuleRecord` per module that ran, in the order they first ran (root first).
    """
    records: dict[str, ModuleRecord] = {}
    order: list[str] = []
    params = {
        name or "<root>": [_record(n, p) for n, p in module.named_parameters(recurse=False)]
        for name, module in model.named_modules()
    }
    handles = []
    for name, module in model.named_modules():
        name = name or "<root>"

        def caller_pre(mod: nn.Module, args: tuple, kw: dict, name: str = name) -> None:
            rec = records.setdefault(name, ModuleRecord(name, type(mod).__name__))
            if rec.calls == 0:
                order.append(name)
                rec.inputs = _tensors((args, kw), "in")
            rec.calls += 1

        def pre(mod: nn.Module, args: tuple, kw: dict, name: str = name) -> None:
            rec = records[name]
            if rec.calls == 1 and not rec.forward_inputs:
                rec.forward_inputs = _tensors((args, kw), "in")

        def post(mod: nn.Module, args: tuple, output: Any, name: str = name) -> None:
            rec = records[name]
            if not rec.outputs:
                rec.outputs = _tensors(output, "out")

        handles.append(module.register_forward_pre_hook(caller_pre, with_kwargs=True, prepend=True))
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name in order:
        records[name].params = params[name]
    return [records[n] for n in order]


def format_sharding_table(records: list[ModuleRecord], *, max_name: int = 44) -> str:
    """A plain-text table of :func:`inspect_sharding` records: one line per input, output and parameter."""
    lines = [f"{'module':<{max_name}} {'type':<26} {'what':<8} placements / local shape / global shape"]
    lines.append("-" * len(lines[0]) + "-" * 40)
    for rec in records:
        first = True
        fwd_in = [] if rec.forward_inputs == rec.inputs else rec.forward_inputs
        for kind, items in (
            ("in", rec.inputs),
            ("fwd-in", fwd_in),
            ("out", rec.outputs),
            ("param", rec.params),
        ):
            for t in items:
                label = f"{kind}:{t.name}" if kind == "param" else kind
                head = (
                    f"{rec.name[-max_name:]:<{max_name}} {rec.type[:26]:<26}"
                    if first
                    else " " * (max_name + 27)
                )
                lines.append(f"{head} {label:<8} {t.short()}  {t.dtype}")
                first = False
    return "\n".join(lines)
