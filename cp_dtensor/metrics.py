"""Training metrics: the rank-0 log line, a JSONL log, optional TensorBoard, an interactive progress bar.

The log line (every ``metrics.log_freq`` steps, and the first and last step)::

    step   10/60 | loss 2.8731 | grad_norm 0.412 | lr 9.1e-04 | tok/s 23,410 (11,705/dev) | tflops 0.051/dev
                 | mfu n/a | mem 0.61 GiB | step 0.350s

``loss``: global token-mean loss; ``grad_norm``: before clipping; ``tok/s``: global tokens per second (and
per device); ``tflops``: achieved model FLOP/s per device (6 x params per token + attention, causal-aware,
see ``model_flops_per_token``); ``mfu``: that over the device peak (``metrics.peak_tflops_per_device``,
or the GPU's known peak; n/a on CPU without one); ``mem``: peak memory (CUDA allocator on GPU, process RSS
on CPU); ``step``: wall time of the step; ``cp work max/mean`` (with CP): attention work (visible query-key
pairs of the step's batch) of the busiest CP rank over the mean, from the batch's layout and mask (with dp > 1:
the largest over the data-parallel ranks' rows); ``cp`` (with CP): bytes the CP attention of rank 0 sent in the
step (forward + backward) and the wall time it spent blocked on CP communication (exposed, not hidden by
compute; on NCCL the host-side wait returns early, so it reads low there).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLogger", "StepMetrics", "gpu_peak_tflops", "peak_memory_bytes"]

# Dense bf16 peak TFLOP/s per GPU (vendor datasheets, no sparsity).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def gpu_peak_tflops() -> float | None:
    """The bf16 dense peak of this machine's GPU, or None (CPU, or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _GPU_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the CUDA allocator's peak on GPU, the process's peak RSS on CPU.

    On Linux the CPU peak is ``VmHWM`` of ``/proc/self/status``, not ``getrusage``'s ``ru_maxrss``: that one
    survives ``exec``, so a spawned rank would report at least what its launcher held when it started it.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB (macOS: bytes)


@dataclass
class StepMetrics:
    """One logged step."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    tflops_per_device: float
    mfu: float | None
    peak_memory_gib: float
    step_time_s: float
    skipped: bool = False
    cp_bytes_sent: int | None = None
    cp_comm_wait_s: float | None = None
    cp_work_imbalance: float | None = None

    def line(self, total_steps: int) -> str:
        """The human-readable log line."""
        width = len(str(total_steps))
        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "n/a"
        return (
            f"step {self.step:>{width}}/{total_steps} | loss {self.loss:.4f} | grad_norm {self.grad_norm:.3f} | "
            f"lr {self.lr:.1e} | tok/s {self.tokens_per_s:,.0f} ({self.tokens_per_s_per_device:,.0f}/dev) | "
            f"tflops {self.tflops_per_device:.3f}/dev | mfu {mfu} | mem {self.peak_memory_gib:.2f} GiB | "
            f"step {self.step_time_s:.3f}s"
            + (
                f" | cp work max/mean {self.cp_work_imbalance:.3f}"
                if self.cp_work_imbalance is not None
                else ""
            )
            + (
                f" | cp {self.cp_bytes_sent / 2**20:,.1f} MiB sent, {self.cp_comm_wait_s:.3f}s waiting"
                if self.cp_bytes_sent is not None and self.cp_comm_wait_s is not None
                else ""
            )
            + (" | SKIPPED (non-finite)" if self.skipped else "")
        )


class MetricsLogger:
    """Writes metrics on rank 0 only; other ranks' calls are no-ops.

    Args:
        is_rank0: whether this process logs.
        total_steps: steps of the run (for the progress display).
        log_freq: log every this many steps (and the first and last).
        log_file: JSONL file, one object per logged step (None: no file).
        tensorboard_dir: TensorBoard event folder (None: off). Needs the ``tensorboard`` package.
        progress: draw a one-line progress bar between log lines (for interactive terminals).
    """

    def __init__(
        self,
        *,
        is_rank0: bool,
        total_steps: int,
        log_freq: int,
        log_file: Path | None = None,
        tensorboard_dir: Path | None = None,
        progress: bool | None = None,
    ) -> None:
        self.is_rank0 = is_rank0
        self.total_steps = total_steps
        self.log_freq = log_freq
        self.history: list[StepMetrics] = []
        self._file = None
        self._tb = None
        self._start = time.perf_counter()
        self.progress = (sys.stdout.isatty() if progress is None else progress) and is_rank0
        if not is_rank0:
            return
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._file = log_file.open("a")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "metrics.enable_tensorboard needs the tensorboard package: pip install tensorboard "
                    f"(or set metrics.enable_tensorboard = false) [{e}]"
                ) from None
            self._tb = SummaryWriter(str(tensorboard_dir))

    def should_log(self, step: int) -> bool:
        """Whether ``step`` (1-based) gets a log line."""
        return step == 1 or step == self.total_steps or step % self.log_freq == 0

    def log(self, m: StepMetrics) -> None:
        """Record one step's metrics (prints/writes only when :meth:`should_log`)."""
        if not self.is_rank0:
            return
        self.history.append(m)
        if self.should_log(m.step):
            if self.progress:
                sys.stdout.write("\r\033[K")
            print(m.line(self.total_steps), flush=True)
            if self._file is not None:
                self._file.write(json.dumps(asdict(m)) + "\n")
                self._file.flush()
            if self._tb is not None:
                for key, value in asdict(m).items():
                    if isinstance(value, float) and key != "step":
                        self._tb.add_scalar(key, value, m.step)
        if self.progress:
            self._draw_progress(m.step)

    def log_validation(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        """Print and record one validation run: its loss per token after training step ``step``.

        The metrics log gets ``{"step", "validation_loss", "validation_tokens", "validation_time_s"}`` (no
        ``"loss"`` key, so tools reading training losses skip it); TensorBoard gets ``validation_loss``.
        """
        if not self.is_rank0:
            return
        if self.progress:
            sys.stdout.write("\r\033[K")
        width = len(str(self.total_steps))
        print(
            f"validation step {step:>{width}}/{self.total_steps} | loss {loss:.4f} | tokens {tokens:,} | "
            f"{seconds:.2f}s",
            flush=True,
        )
        record = {
            "step": step,
            "validation_loss": loss,
            "validation_tokens": tokens,
            "validation_time_s": seconds,
        }
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            self._tb.add_scalar("validation_loss", loss, step)

    def info(self, message: str) -> None:
        """Print a message on rank 0."""
        if self.is_rank0:
            print(message, flush=True)

    def _draw_progress(self, step: int) -> None:
        done = step / self.total_steps
        elapsed = time.perf_counter() - self._start
        eta = elapsed / done - elapsed if done > 0 else 0.0
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        sys.stdout.write(f"\r[{bar}] {step}/{self.total_steps} eta {eta:5.0f}s")
        sys.stdout.flush()
        if step == self.total_steps:
            sys.stdout.write("\n")

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def summary(self) -> dict[str, Any]:
        """First/last logged loss and mean throughput (rank 0)."""
        if not self.history:
            return {}
        return {
            "first_loss": self.history[0].loss,
            "last_loss": self.history[-1].loss,
            "mean_tokens_per_s": sum(m.tokens_per_s for m in self.history) / len(self.history),
        }
