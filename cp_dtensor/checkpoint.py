"""Resumable, reshardable, crash-safe checkpoints with ``torch.distributed.checkpoint`` (DCP).

Note [Atomic checkpoints]
~~~~~~~~~~~~~~~~~~~~~~~~~
::

    folder/
      step-20/            published: DCP files + .metadata + manifest.json (names and sizes of all files,
                          the model's fingerprint: its name and every parameter's full shape)
      step-40/
      .step-60.tmp/       being written (or left by a crash): never loaded, removed by the next save

    save(step):  every rank writes its DCP shards into .step-N.tmp  -> barrier
                 rank 0 writes manifest.json (via a temp file + rename), then renames the folder to step-N
                 (an atomic rename on one file system)  -> retention (keep_latest_k)  -> barrier
    load():      newest published step first; a folder whose manifest is missing or whose files do not
                 match it, or that DCP cannot read, is reported and skipped in favour of the previous one.
                 A checkpoint of another model (its fingerprint differs from this job's) stops the load
                 with one line naming both models and the first difference, before any tensor is read.

Model and optimizer state are DTensor state dicts keyed by fully qualified parameter names
(``get_model_state_dict`` / flattened ``get_optimizer_state_dict``), so a checkpoint saved with one set of
parallel degrees loads under another: DCP reshards on load.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "ModelState",
    "ObjectState",
    "OptimizerState",
    "fingerprint_mismatch",
    "load_model_weights",
    "model_fingerprint",
]

MANIFEST = "manifest.json"
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or no usable checkpoint could be loaded."""


class ModelState(Stateful):
    """The model parts of this rank as one state dict keyed by fully qualified names."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {}
        for part in self.parts:
            sd.update(get_model_state_dict(part))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            keys = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state_dict[k] for k in keys})


class OptimizerState(Stateful):
    """The optimizers of this rank's parts, flattened to parameter-name keys (reshardable)."""

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizers):
            sd.update(get_optimizer_state_dict(part, opt, options=_FLAT))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.parts, self.optimizers):
            keys = get_optimizer_state_dict(part, opt, options=_FLAT).keys()
            set_optimizer_state_dict(part, opt, {k: state_dict[k] for k in keys}, options=_FLAT)


class ObjectState(Stateful):
    """Adapter for anything with ``state_dict()``/``load_state_dict()`` (schedulers, loaders, counters)."""

    def __init__(self, get: Callable[[], dict[str, Any]], put: Callable[[dict[str, Any]], None]) -> None:
        self._get = get
        self._put = put

    def state_dict(self) -> dict[str, Any]:
        return self._get()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._put(state_dict)


def model_fingerprint(model: nn.Module, name: str, settings: dict[str, str] | None = None) -> dict[str, Any]:
    """What a checkpoint records about the model it was saved for: its name and every parameter's full shape.

    Args:
        model: the whole model before parallelization (a meta-device model is enough: only shapes are read).
        name: how the model is called in messages, e.g. ``"llama3/debug"``.
        settings: the config options that chose the model, e.g. ``{"model.flavor": "debug"}``; a mismatch
            message tells which of them to set to resume.

    Returns:
        ``{"model": name, "settings": settings, "params": {fully qualified name: [full shape]}}``, JSON-ready.
    """
    params = {n: list(p.shape) for n, p in model.named_parameters()}
    return {"model": name, "settings": dict(settings or {}), "params": params}


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first difference between the parameters of two fingerprints, in words; None when they match.

    Only names and shapes count: a checkpoint whose parameters fit loads even if its model name differs.
    """
    was, now = saved.get("params", {}), current.get("params", {})
    shapes = [k for k in now if k in was and list(was[k]) != list(now[k])]
    missing = [k for k in now if k not in was]
    extra = [k for k in was if k not in now]
    problems = []
    if shapes:
        k = shapes[0]
        problems.append(f"{k} has shape {tuple(was[k])} in the checkpoint, {tuple(now[k])} here")
    if missing:
        problems.append(f"{missing[0]} is not in the checkpoint")
    if extra:
        problems.append(f"the checkpoint has {extra[0]}, this model does not")
    if not problems:
        return None
    more = len(shapes) + len(missing) + len(extra) - len(problems)
    return "; ".join(problems) + (f" (and {more} more difference(s))" if more else "")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves and loads training state under ``folder`` (see Note [Atomic checkpoints]).

    Args:
        folder: checkpoint root folder.
        keep_latest_k: keep only the newest k published checkpoints (0 keeps all).
        log: where to report skipped (corrupt) checkpoints; rank 0 only.
    """

    def __init__(self, folder: Path, *, keep_latest_k: int = 0, log: Callable[[str], None] = print) -> None:
        self.folder = Path(folder)
        self.keep_latest_k = keep_latest_k
        self.log = log

    def step_dir(self, step: int) -> Path:
        """Folder of the published checkpoint of ``step``."""
        return self.folder / f"step-{step}"

    def published_steps(self) -> list[int]:
        """Steps with a published folder (manifest present), oldest first."""
        if not self.folder.is_dir():
            return []
        steps = []
        for p in self.folder.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / MANIFEST).exists():
                steps.append(int(p.name[5:]))
        return sorted(steps)

    def save(self, step: int, state: dict[str, Any], fingerprint: dict[str, Any] | None = None) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically (a collective: call on every rank).

        Args:
            step: the training step the state belongs to.
            state: the stateful objects to save.
            fingerprint: the model's :func:`model_fingerprint`, kept in the manifest so that a load can
                check it before reading tensors.
        """
        tmp = self.folder / f".step-{step}.tmp"
        if _is_rank0():
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        final = self.step_dir(step)
        if _is_rank0():
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {
                "step": step,
                "files": files,
                "saved_at": time.time(),
                "seconds": time.perf_counter() - t0,
            }
            if fingerprint is not None:
                manifest["fingerprint"] = fingerprint
            part = tmp / (MANIFEST + ".part")
            part.write_text(json.dumps(manifest, indent=1))
            os.replace(part, tmp / MANIFEST)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            self._apply_retention()
        _barrier()
        return final

    def _apply_retention(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for old in self.published_steps()[: -self.keep_latest_k]:
            shutil.rmtree(self.step_dir(old), ignore_errors=True)

    def verify(self, step: int) -> str | None:
        """Why the checkpoint of ``step`` is unusable (missing/size-mismatched files), or None if intact."""
        path = self.step_dir(step)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            return f"manifest unreadable ({e})"
        if ".metadata" not in manifest.get("files", {}):
            return "no DCP .metadata file recorded"
        for name, size in manifest["files"].items():
            f = path / name
            if not f.is_file():
                return f"file {name} is missing"
            if f.stat().st_size != size:
                return f"file {name} has {f.stat().st_size} bytes, the manifest says {size}"
        return None

    def load(
        self, state: dict[str, Any], step: int = -1, fingerprint: dict[str, Any] | None = None
    ) -> int | None:
        """Load the newest usable checkpoint (or exactly ``step``) into ``state``; return its step.

        Returns None when there is no checkpoint at all. A checkpoint that fails verification or that DCP
        cannot read is reported and skipped in favour of the previous one; every rank makes the same
        choice.

        Args:
            state: the stateful objects to load into.
            step: load exactly this step (-1: the newest usable one).
            fingerprint: this job's :func:`model_fingerprint`; a checkpoint that recorded a different one
                stops the load before any tensor is read (checkpoints without one are not checked).

        Raises:
            CheckpointError: checkpoints exist but none is usable, ``step`` is given and unusable, or the
                checkpoint was saved for another model (one line: both models and the first difference).
        """
        candidates = self.published_steps()[::-1]
        if step >= 0:
            if step not in candidates:
                raise CheckpointError(
                    f"checkpoint.load_step={step}: no published checkpoint {self.step_dir(step)}"
                )
            candidates = [step]
        if not candidates:
            return None
        for s in candidates:
            problem = self.verify(s) if _is_rank0() else None
            mismatch = self.model_mismatch(s, fingerprint) if _is_rank0() and problem is None else None
            problem, mismatch = _broadcast_object((problem, mismatch))
            if mismatch is not None:
                raise CheckpointError(mismatch)
            if problem is None:
                try:
                    dcp.load(state, checkpoint_id=str(self.step_dir(s)))
                    return s
                except (Exception, dcp.CheckpointException) as e:  # DCP raises on every rank if one fails
                    problem = f"DCP could not read it: {_last_error_line(e)}"
            if _is_rank0():
                self.log(f"checkpoint {self.step_dir(s)} is unusable: {problem}; trying the previous one")
            if step >= 0:
                raise CheckpointError(f"checkpoint {self.step_dir(s)} is unusable: {problem}")
        raise CheckpointError(
            f"no usable checkpoint in {self.folder} (tried steps {candidates}); remove the folder to start fresh"
        )

    def model_mismatch(self, step: int, fingerprint: dict[str, Any] | None) -> str | None:
        """Why the checkpoint of ``step`` belongs to another model than ``fingerprint``, or None.

        None too when either side has no fingerprint (checkpoints saved before fingerprints existed).
        """
        if fingerprint is None:
            return None
        try:
            saved = json.loads((self.step_dir(step) / MANIFEST).read_text()).get("fingerprint")
        except (OSError, ValueError):
            return None  # verify() reports an unreadable manifest
        if saved is None:
            return None
        difference = fingerprint_mismatch(saved, fingerprint)
        if difference is None:
            return None
        now = fingerprint.get("settings", {})
        differing = [f"--{k} {v}" for k, v in saved.get("settings", {}).items() if now.get(k) != v]
        resume = (
            "resume with " + " ".join(differing) if differing else "resume with the model it was saved for"
        )
        return (
            f"checkpoint {self.step_dir(step)} was saved for model {saved.get('model', '?')}, not "
            f"{fingerprint.get('model', '?')}: {difference}; {resume}, or set another checkpoint.folder (or "
            f"job.dump_folder) to start fresh"
        )


def _last_error_line(e: BaseException) -> str:
    """``Type: message`` of the innermost error, one line (DCP's CheckpointException wraps every rank's
    traceback; its last line is the underlying error)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, dcp.CheckpointException) and lines:
        return lines[-1][:300]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _broadcast_object(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_model_weights(
    path: str | Path, model: ModelState, fingerprint: dict[str, Any] | None = None
) -> None:
    """Load only the model weights of a published checkpoint folder (``checkpoint.initial_load_path``).

    Resharding works as for a resume (DCP); optimizer, data and step state stay as they are.

    Args:
        path: A ``step-N`` folder written by :class:`CheckpointManager`.
        model: The model parts to fill.
        fingerprint: This job's :func:`model_fingerprint`, checked against the folder's manifest first.

    Raises:
        CheckpointError: The folder is not a published checkpoint, or it holds another model (one line).
    """
    path = Path(path)
    try:
        saved = json.loads((path / MANIFEST).read_text()).get("fingerprint")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint.initial_load_path {path} is not a published cp_dtensor checkpoint (no readable "
            f"{MANIFEST}: {e}); for a HuggingFace folder set checkpoint.initial_load_in_hf = true"
        ) from None
    if saved is not None and fingerprint is not None:
        difference = fingerprint_mismatch(saved, fingerprint)
        if difference is not None:
            raise CheckpointError(
                f"checkpoint.initial_load_path {path} holds model {saved.get('model')!r}, this job builds "
                f"{fingerprint.get('model')!r}: {difference}"
            )
    dcp.load({"model": model}, checkpoint_id=str(path))
