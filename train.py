#!/usr/bin/env python3
"""Train a Llama model with context parallelism (and TP, FSDP2, PP) from a TOML config.

python train.py --config train_configs/debug_cpu.toml              # spawns the local CPU ranks it needs
python train.py --config train_configs/debug_cpu.toml --training.steps 20
torchrun --nproc-per-node 8 train.py --config train_configs/llama3_8b_128k.toml
python train.py --help                                             # every option with its default
"""

from __future__ import annotations

import os
import sys

from cp_dtensor.cli import main
from cp_dtensor.launch import end_process

if __name__ == "__main__":
    end_process(main(sys.argv[1:], prog=os.path.basename(__file__)))  # Note [Ending a rank]
