"""Facts about the machine for report headers: cores, CPU model, versions, load, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from typing import Any

import torch

__all__ = ["machine_facts"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                if row.startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, torch/python versions, platform and the date (UTC), for report headers."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_count": os.cpu_count(),
        "usable_cores": affinity,
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads_default": torch.get_num_threads(),
        "load_average_at_start": load,
        "cuda_available": torch.cuda.is_available(),
    }
