#!/usr/bin/env bash
# Install what is missing, then train (arguments go to train.py).
#   scripts/run_train.sh --config train_configs/debug_cpu.toml
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source scripts/install.sh test
exec "$PY" train.py "$@"
