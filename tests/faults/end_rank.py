"""Ranks that leave a live gloo process group to teardown and end with ``end_process`` (under torchrun).

``python -m torch.distributed.run --nproc-per-node 5 tests/faults/end_rank.py LOG``: every rank logs one
line to ``LOG.<rank>`` and prints one without a newline (only a flush writes either), then all-gathers
over gloo and calls ``end_process(0)`` at once, the group still alive. Ending through interpreter teardown
instead aborts a rank in many such runs ("terminate called without an active exception").
"""

import logging
import os
import sys

import torch
import torch.distributed as dist

from cp_dtensor.launch import end_process

rank = int(os.environ["RANK"])
log = logging.getLogger("end_rank")
log.addHandler(logging.FileHandler(f"{sys.argv[1]}.{rank}"))
log.setLevel(logging.INFO)
log.info("rank %d", rank)
print(f"rank {rank} done", end="")
dist.init_process_group("gloo")
gathered = [torch.empty(1) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, torch.tensor([float(rank)]))
end_process(0)
