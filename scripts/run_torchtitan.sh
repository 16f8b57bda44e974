#!/usr/bin/env bash
# torchtitan's trainer with its debug Llama 3 and context_parallel_degree = 2 through cp_dtensor's ring
# attention (cp_dtensor.integrations.torchtitan), on NPROC local processes: CPU/gloo without a GPU, one GPU
# per process with them. Installs what is missing first, the torchtitan extra included, never replacing the
# installed torch (pip runs with a constraint pinning it). Extra arguments go to torchtitan's command line.
#   scripts/run_torchtitan.sh                                      # 10 steps, cp=2 on 2 processes
#   scripts/run_torchtitan.sh --training.steps 4 --cp_dtensor.comm allgather
#   NPROC=4 scripts/run_torchtitan.sh --parallelism.context_parallel_degree 4
# Per-step metrics: <job.dump_folder>/train_log.jsonl (default outputs/torchtitan_llama3_debug_cp2/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source scripts/install.sh torchtitan
exec "$PY" -m torch.distributed.run --nproc-per-node "${NPROC:-2}" \
  -m cp_dtensor.integrations.torchtitan --job.config_file train_configs/torchtitan/llama3_debug_cp2.toml "$@"
