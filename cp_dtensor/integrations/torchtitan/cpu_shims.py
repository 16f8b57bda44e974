"""What torchtitan 0.2.x needs to train on a machine without an accelerator (CPU, gloo).

Note [torchtitan on CPU]
~~~~~~~~~~~~~~~~~~~~~~~~
Three fixes, each applied only where it is needed; they set torchtitan module attributes and FSDP
options, never a torch function::

    import cp_dtensor.integrations.torchtitan
      fix 1  no triton        sys.modules["torchtitan.models.moe.kernels"] = placeholder   (then torchtitan)
    main(), no accelerator
      fix 2  device "cuda"    torchtitan.*.device_type = "cpu", device_module = _CpuDeviceModule
    parallelize_llama, gloo
      fix 3  no PREMUL_SUM    FSDPModule.set_force_sum_reduction_for_comms(True)

1. ``import torchtitan`` imports its MoE token-permutation kernels, which ``import triton`` at module level
   (triton, a GPU kernel compiler, does not come with the CPU build of torch).
   :func:`stub_moe_kernels_without_triton` puts a placeholder module for ``torchtitan.models.moe.kernels``
   in ``sys.modules`` first; it raises if an MoE model ever calls it.
2. torchtitan picks its device as ``_get_available_device_type() or "cuda"``, i.e. CUDA on a CPU machine,
   and binds ``device_type`` / ``device_module`` into several modules at import.
   :func:`configure_torchtitan_for_cpu` sets them to ``"cpu"`` and a small stand-in for the ``torch.cuda``
   calls torchtitan makes (device name and memory, peak RSS as the memory peak).
3. gloo has no ``ReduceOp.PREMUL_SUM``; :func:`force_sum_reduction_on_gloo` makes FSDP's gradient
   reduce-scatter a plain sum, which is exact here because torchtitan sets the divide factor to 1 (the
   loss is already normalized by the global token count).

This module imports no torchtitan module at import time: fix 1 must run before the first one is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import resource
import sys
import types
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

__all__ = ["configure_torchtitan_for_cpu", "force_sum_reduction_on_gloo", "stub_moe_kernels_without_triton"]

MOE_KERNELS_MODULE = "torchtitan.models.moe.kernels"
"""torchtitan's MoE kernel module, the one that imports triton at module level."""

DEVICE_BOUND_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.components.metrics",
    "torchtitan.tools.profiling",
)
"""Modules of torchtitan 0.2.x that bind ``device_type`` / ``device_module`` at import (fix 2)."""


# -- fix 1 -------------------------------------------------------------------------------------------------


def stub_moe_kernels_without_triton() -> None:
    """Fix 1: make ``import torchtitan`` work without triton (Note [torchtitan on CPU]).

    torchtitan 0.2.x imports ``torchtitan.models.moe.kernels`` (``import triton`` at module level) from its
    package ``__init__`` through the float8/MX converters; only MoE models with expert parallelism call it.
    Does nothing when triton is installed, torchtitan is missing, or the module is already imported.
    """
    if MOE_KERNELS_MODULE in sys.modules or importlib.util.find_spec("torchtitan") is None:
        return
    if importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(MOE_KERNELS_MODULE, "cp_dtensor placeholder: triton is not installed.")

    def generate_permute_indices(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "torchtitan's MoE token-permutation kernel needs triton, which is not installed; "
            "cp_dtensor's torchtitan integration serves dense Llama 3 only."
        )

    stub.generate_permute_indices = generate_permute_indices  # type: ignore[attr-defined]
    sys.modules[MOE_KERNELS_MODULE] = stub


# -- fix 2 -------------------------------------------------------------------------------------------------


class _CpuDeviceModule:
    """The subset of the ``torch.cuda`` API that torchtitan 0.2.x calls, answered for the CPU.

    Memory "peaks" are the process's max RSS (Linux reports KiB); the capacity is the physical memory.
    """

    @staticmethod
    def set_device(device: Any) -> None:
        """No-op: there is one CPU device."""

    @staticmethod
    def current_device() -> int:
        """Index 0 (``torch.distributed.barrier(device_ids=[...])`` needs an int)."""
        return 0

    @staticmethod
    def device_count() -> int:
        """One CPU device."""
        return 1

    @staticmethod
    def is_available() -> bool:
        """Always available."""
        return True

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """No-op: CPU ops are synchronous."""

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        """The processor name, or "cpu"."""
        return platform.processor() or "cpu"

    @staticmethod
    def get_device_properties(device: Any = None) -> types.SimpleNamespace:
        """An object with ``total_memory`` (bytes of physical memory)."""
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(total_memory=total, name=_CpuDeviceModule.get_device_name())

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        """No-op: max RSS cannot be reset."""

    @staticmethod
    def empty_cache() -> None:
        """No-op: no caching allocator."""

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        """Peak memory as the allocator keys torchtitan reads."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }


def configure_torchtitan_for_cpu() -> None:
    """Fix 2: make torchtitan's trainer use the CPU and gloo (Note [torchtitan on CPU]).

    Call it before building torchtitan's ``Trainer`` when ``torch.accelerator.is_available()`` is False;
    :func:`~cp_dtensor.integrations.torchtitan.main` does. It sets the module attributes
    ``device_type = "cpu"`` and ``device_module`` (a stand-in for the ``torch.cuda`` calls torchtitan makes)
    where torchtitan bound them at import.
    """
    for name in DEVICE_BOUND_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = _CpuDeviceModule


# -- fix 3 -------------------------------------------------------------------------------------------------


def force_sum_reduction_on_gloo(model: nn.Module) -> None:
    """Fix 3: FSDP reduce-scatters gradients with a plain sum when the backend is gloo (no PREMUL_SUM).

    Call it after ``fully_shard``; it does nothing on other backends.
    """
    if dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
