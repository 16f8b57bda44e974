"""Measurement helpers shared by the benchmark scripts (no timing policy lives here).

* robust summaries of repeated timings (:func:`summarize`),
* theoretical communication minimum of context-parallel attention (:func:`min_bytes_per_rank`),
* the measured fraction of communication hidden behind compute (:func:`hidden_fraction`),
* saved-for-backward bytes of a forward (:func:`saved_bytes_during`),
* stand-ins for communication: :class:`LocalCopyTransport` (cp_dtensor's ring with local copies),
  :class:`LocalCollectivesMode` (PyTorch's functional collectives answered by local copies),
  :class:`CollectiveMeter` (bytes sent and time blocked in PyTorch's functional collectives),
* markdown tables and machine facts for report headers.

Note [Hidden communication]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Three timings of the same forward+backward, each the max over ranks after a barrier::

    a = compute + exposed comm        real ring (communication in flight while kernels run)
    b = compute                       same code, every transfer replaced by a local copy of the buffer
    c = comm                          the same messages in the same order, no compute at all

    exposed = a - b        hidden = 1 - exposed / c        clipped to [0, 1]

hidden = 1: the ring is as fast as if communication were free; hidden = 0: communication added its
full standalone time. ``a - b`` is a difference of two long noisy timings, so it is taken per repeat
(paired, interleaved) and the median is used; when the spread of ``a - b`` exceeds ``c`` the estimate
says little, and the report gives the spread next to it. A second, direct estimate uses the time the
ranks spent blocked waiting for transfers (``wait``): hidden_wait = 1 - wait / c.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cp_dtensor.attention.comm import Pending, ProcessGroupTransport, Transport

__all__ = [
    "CollectiveMeter",
    "LocalCollectivesMode",
    "LocalCopyTransport",
    "Summary",
    "TimedTransport",
    "dtype_from_name",
    "format_bytes",
    "hidden_fraction",
    "machine_facts",
    "markdown_table",
    "min_bytes_per_rank",
    "saved_bytes_during",
    "score_elements",
    "summarize",
    "time_call",
]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (also float64, bfloat16, float16)."""
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


@dataclass
class Summary:
    """Order statistics of a list of timings (seconds)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int
    values: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, min, max and quartiles (inclusive method) of ``values``; NaNs for an empty list."""
    vals = [float(v) for v in values]
    if not vals:
        nan = float("nan")
        return Summary(nan, nan, nan, nan, nan, 0, [])
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return Summary(statistics.median(vals), min(vals), max(vals), q1, q3, len(vals), vals)


def min_bytes_per_rank(
    *, batch: int, kv_heads: int, seq_len: int, head_dim: int, cp: int, dtype: torch.dtype
) -> dict[str, int]:
    """Theoretical minimum of bytes one rank must send in ring attention (forward, backward).

    Forward: every rank must receive the K and V shards of the CP-1 other ranks, so each sends
    (CP-1) x (K+V shard bytes of Hkv heads). Backward: the same KV again (nothing but q, k, v, out and lse
    is saved), plus the dK/dV partial sums of the other ranks' shards must reach their owners: a
    reduce-scatter, (CP-1) x dK/dV shard bytes per rank, in the accumulation dtype (fp32; fp64 for fp64).

    Returns:
        ``{"forward": ..., "backward": ..., "kv_shard": ..., "dkv_shard": ...}`` in bytes.
    """
    s_local = seq_len // cp
    elements = 2 * batch * kv_heads * s_local * head_dim  # K and V: (2, B, Hkv, S_local, D)
    acc_size = 8 if dtype == torch.float64 else 4
    kv_shard = elements * torch.tensor([], dtype=dtype).element_size()
    dkv_shard = elements * acc_size
    return {
        "forward": (cp - 1) * kv_shard,
        "backward": (cp - 1) * (kv_shard + dkv_shard),
        "kv_shard": kv_shard,
        "dkv_shard": dkv_shard,
    }


def score_elements(batch: int, q_heads: int, sq: int, sk: int, causal: bool) -> int:
    """Visible (query, key) score elements of one attention call (causal blocks are square)."""
    per_head = sq * (sq + 1) // 2 if causal else sq * sk
    return batch * q_heads * per_head


def hidden_fraction(exposed_s: float, comm_s: float) -> float:
    """``1 - exposed / comm`` clipped to [0, 1] (see Note [Hidden communication]); NaN without comm."""
    if not comm_s > 0 or exposed_s != exposed_s:  # no communication, or NaN
        return float("nan")
    return min(1.0, max(0.0, 1.0 - exposed_s / comm_s))


@contextlib.contextmanager
def saved_bytes_during(record: dict[str, int]) -> Iterator[None]:
    """Count the bytes autograd saves for backward inside the block (unique storages).

    Every tensor packed by autograd is counted once by its storage (views of one storage share it; a
    saved input is counted, since keeping it alive is what saving costs). ``record`` receives
    ``bytes`` and ``tensors``.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    record["bytes"] = sum(seen.values())
    record["tensors"] = len(seen)


class TimedTransport(ProcessGroupTransport):
    """cp_dtensor's process-group transport that also measures time blocked in communication.

    ``wait_seconds`` adds the time spent in every :meth:`Pending.wait` of point-to-point transfers and the
    whole duration of the (blocking) all-gather and reduce-scatter collectives; ``wait_by_kind`` splits it
    by message tag (``"tag<N>"``) and ``"collective"``.
    """

    def __init__(self, group: torch.distributed.ProcessGroup) -> None:
        super().__init__(group)
        self.wait_seconds = 0.0
        self.wait_by_kind: dict[str, float] = {}

    def _add(self, kind: str, seconds: float) -> None:
        self.wait_seconds += seconds
        self.wait_by_kind[kind] = self.wait_by_kind.get(kind, 0.0) + seconds

    def _timed(self, pending: Pending, kind: str) -> Pending:
        def wait() -> torch.Tensor | None:
            t0 = time.perf_counter()
            result = pending.wait()
            self._add(kind, time.perf_counter() - t0)
            return result

        return Pending(wait)

    def exchange(self, send: torch.Tensor, tag: int) -> Pending:
        return self._timed(super().exchange(send, tag), f"tag{tag}")

    def send(self, tensor: torch.Tensor, tag: int) -> Pending:
        return self._timed(super().send(tensor, tag), f"tag{tag}")

    def recv(self, like: torch.Tensor, tag: int, dtype: torch.dtype | None = None) -> Pending:
        return self._timed(super().recv(like, tag, dtype=dtype), f"tag{tag}")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().all_gather(tensor)
        self._add("collective", time.perf_counter() - t0)
        return out

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().reduce_scatter(tensor)
        self._add("collective", time.perf_counter() - t0)
        return out


class LocalCopyTransport(Transport):
    """A transport whose transfers are local copies of the right shape (no process group involved).

    ``exchange`` returns a copy of what was sent, ``recv`` a copy of the last tensor this rank sent with
    that tag (zeros before the first), ``all_gather`` ``size`` copies, ``reduce_scatter`` a copy of this
    rank's entry. The values are wrong, the shapes, dtypes and memory traffic are those of the real ring:
    running cp_dtensor's ring code on it times the compute (plus the copies) without communication.
    """

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size
        self.bytes_sent = 0
        self._last: dict[int, torch.Tensor] = {}

    def exchange(self, send: torch.Tensor, tag: int) -> Pending:
        recv = torch.empty_like(send, memory_format=torch.contiguous_format)
        recv.copy_(send)
        return Pending(lambda: recv)

    def send(self, tensor: torch.Tensor, tag: int) -> Pending:
        self._last[tag] = tensor
        return Pending(lambda: None)

    def recv(self, like: torch.Tensor, tag: int, dtype: torch.dtype | None = None) -> Pending:
        last = self._last.get(tag)
        out = torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        if last is not None and last.shape == like.shape:
            out.copy_(last)
        return Pending(lambda: out)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0).expand(self.size, *tensor.shape).clone()

    def reduce_scatter(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.rank].clone()


def _c10d_op(name: str) -> Any:
    return getattr(torch.ops._c10d_functional, name).default


class LocalCollectivesMode(TorchDispatchMode):
    """Answer PyTorch's functional collectives (what its ring rotaters use) with local copies.

    ``all_to_all_single`` returns a copy of its input, ``all_gather_into_tensor`` ``group_size`` copies,
    ``wait_tensor`` its argument: PyTorch's ring loop then runs its compute without communication.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _c10d_op("all_to_all_single"):
            return args[0].clone()
        if func is _c10d_op("all_gather_into_tensor"):
            x, group_size = args[0], args[1]
            return (
                x.unsqueeze(0)
                .expand(group_size, *x.shape)
                .reshape(group_size * x.shape[0], *x.shape[1:])
                .clone()
            )
        if func is _c10d_op("wait_tensor"):
            return args[0]
        return func(*args, **kwargs)


class CollectiveMeter(TorchDispatchMode):
    """Count bytes sent by, and time blocked in, PyTorch's functional collectives on this rank.

    Bytes: ``all_to_all_single`` sends its input splits addressed to other ranks; ``all_gather_into_tensor``
    is counted as a ring all-gather, (group_size - 1) x input bytes (the convention of cp_dtensor's
    ``RingStats``). Bytes go to ``bytes_by_phase[phase]``; set :attr:`phase` before each phase.
    Waits: the time in ``wait_tensor`` goes to ``wait_seconds``.
    """

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.phase = "forward"
        self.bytes_by_phase: dict[str, int] = {}
        self.calls_by_phase: dict[str, int] = {}
        self.wait_seconds = 0.0

    def _add(self, nbytes: int) -> None:
        self.bytes_by_phase[self.phase] = self.bytes_by_phase.get(self.phase, 0) + nbytes
        self.calls_by_phase[self.phase] = self.calls_by_phase.get(self.phase, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _c10d_op("all_to_all_single"):
            x, _out_splits, in_splits = args[0], args[1], args[2]
            row_bytes = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
            sent_rows = sum(n for dst, n in enumerate(in_splits) if dst != self.rank)
            self._add(sent_rows * row_bytes)
        elif func is _c10d_op("all_gather_into_tensor"):
            x, group_size = args[0], args[1]
            self._add((group_size - 1) * x.numel() * x.element_size())
        elif func is _c10d_op("wait_tensor"):
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            self.wait_seconds += time.perf_counter() - t0
            return out
        return func(*args, **kwargs)


def format_bytes(n: float) -> str:
    """Human-readable bytes with binary prefixes (``16.0 MiB``)."""
    if n != n:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table with the columns padded for reading in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


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


def time_call(fn: Callable[[], Any]) -> tuple[float, float]:
    """Run ``fn()``; return (wall seconds, this process's CPU seconds, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0
