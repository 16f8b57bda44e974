#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (extra arguments go to pytest).
#   scripts/test.sh                 # everything, slow tests included (what CI runs)
#   scripts/test.sh -m "not slow"   # the quick subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source scripts/install.sh test,torchtitan,hf
exec "$PY" -m pytest "$@"
