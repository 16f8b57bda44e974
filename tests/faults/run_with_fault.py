"""Test helper: run train.py's main with one injected fault (used by tests/test_faults.py).

    python tests/faults/run_with_fault.py MODE RANK STEP -- [train.py arguments]

MODE: ``raise`` (RuntimeError on rank RANK at step STEP), ``hang`` (rank RANK stops at step STEP without
exiting), ``crash_in_save`` (rank RANK kills itself after
writing its shards of the checkpoint of step STEP, before it is published), ``nan`` (the loss of step STEP
is NaN on every rank). The patches run at import, so the spawned ranks (which re-import this file as their
main module) get them too.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cp_dtensor.checkpoint as ckpt
import cp_dtensor.train_step as train_step_module
from cp_dtensor.cli import main
from cp_dtensor.trainer import Trainer

_split = sys.argv.index("--")
MODE, RANK, STEP = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
TRAIN_ARGV = sys.argv[_split + 1 :]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


_original_step = Trainer.train_one_step
_original_save = ckpt.dcp.save
_original_loss = train_step_module.token_loss_sum
_state = {"step": 0}


def _train_one_step(self: Trainer):
    _state["step"] = self.step + 1
    if MODE == "raise" and _rank() == RANK and self.step + 1 == STEP:
        raise RuntimeError(f"injected fault on rank {RANK} at step {STEP}")
    if MODE == "hang" and _rank() == RANK and self.step + 1 == STEP:
        time.sleep(3600)  # alive but silent: the others must time out
    return _original_step(self)


def _dcp_save(state, checkpoint_id):
    result = _original_save(state, checkpoint_id=checkpoint_id)
    if MODE == "crash_in_save" and _rank() == RANK and f".step-{STEP}.tmp" in str(checkpoint_id):
        os.kill(os.getpid(), signal.SIGKILL)
    return result


def _loss(logits, labels):
    loss = _original_loss(logits, labels)
    return loss * float("nan") if MODE == "nan" and _state["step"] == STEP else loss


Trainer.train_one_step = _train_one_step
ckpt.dcp.save = _dcp_save
train_step_module.token_loss_sum = _loss

if __name__ == "__main__":
    sys.exit(main(TRAIN_ARGV))
