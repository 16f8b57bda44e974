#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (extra arguments go to pytest).
#   scripts/test.sh                 # everything, slow tests included (what CI runs)
#   scripts/test.sh -m "not slow"   # the quick subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch 2.13.0 comes from local disk; installing it first means the project's
# `torch>=2.13` requirement is already met and pip never pulls a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test]"
exec "$PY" -m pytest "$@"
