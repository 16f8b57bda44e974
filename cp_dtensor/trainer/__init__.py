"""The training loop: config -> mesh -> parallelized model -> data -> steps -> metrics -> checkpoints.

Modules: :mod:`~cp_dtensor.trainer.checks` (:func:`validate_job`: every check that needs the world size and
the model shape), :mod:`~cp_dtensor.trainer.memory_estimate` (activation bytes per rank, the memory
check), :mod:`~cp_dtensor.trainer.model_factory` (the model a config names),
:mod:`~cp_dtensor.trainer.builders` (data, LR schedule, CP strategy) and :mod:`~cp_dtensor.trainer.loop`
(:class:`Trainer`).

Runs on every rank with the default process group initialized (``cp_dtensor.launch`` does that for
``train.py``, under torchrun or by spawning local CPU processes).

Note [Trainer step]
~~~~~~~~~~~~~~~~~~~
::

    global batch k (same on every rank; depends only on seed and k)
      -> shard_batch: DTensors on ("dp", "cp", "tp"): rows of this dp rank, sequence shards of this cp
         rank (layout order, positions follow; Note [Layout-ordered DTensors])
      -> train_step: accumulation chunks of local_batch_size rows (PP: pipeline microbatches)
         loss = sum CE / global token count; FSDP sums grads over dp x cp; clip; AdamW; LR schedule
      -> metrics (rank 0) -> checkpoint every `interval` steps and at the end
"""

from cp_dtensor.trainer.builders import _build_data as _build_data  # tests build the data alone
from cp_dtensor.trainer.builders import build_lr_lambda, job_comm_choice
from cp_dtensor.trainer.checks import validate_job
from cp_dtensor.trainer.loop import Trainer
from cp_dtensor.trainer.memory_estimate import MemoryBudget, activation_bytes_per_rank, local_memory_budget
from cp_dtensor.trainer.model_factory import build_model, model_args_for

__all__ = [
    "MemoryBudget",
    "Trainer",
    "activation_bytes_per_rank",
    "build_lr_lambda",
    "build_model",
    "job_comm_choice",
    "local_memory_budget",
    "model_args_for",
    "validate_job",
]
