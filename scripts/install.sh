#!/usr/bin/env bash
# Install what cp_dtensor needs, if missing (sourced by scripts/test.sh and scripts/run_train.sh).
# The CPU build of torch 2.13.0 comes from local disk; installing it first means the project's
# `torch>=2.13` requirement is already met and pip never pulls a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test]"
