#!/usr/bin/env bash
# Install what cp_dtensor needs, if missing (sourced by scripts/test.sh and scripts/run_train.sh).
#   source scripts/install.sh [EXTRAS]      EXTRAS: pip extras of the project, default "test"
# The CPU build of torch 2.13.0 comes from local disk; installing it first, then pinning whatever torch is
# installed with a constraint, means no extra (torchtitan included) can pull a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
EXTRAS=${1:-test}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
constraint=$(mktemp)
"$PY" -c "import torch; print(f'torch=={torch.__version__}')" > "$constraint"
"$PY" -m pip install --quiet --constraint "$constraint" -e ".[${EXTRAS}]"
rm -f "$constraint"
