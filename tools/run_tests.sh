#!/usr/bin/env bash
# All tests: pytest (Python, fused vs reference, optimizers, programs) then ctest (C++).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-${NATASHA_VENV:-.venv}/bin/python}
"$PY" -m pytest -q -ra "$@"
PYTHON="$PY" bash tools/ctest.sh
