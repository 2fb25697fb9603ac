#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install the project. Usage: scripts/setup.sh [extra]
#   scripts/setup.sh        runtime only
#   scripts/setup.sh test   runtime + test tools (pytest, hypothesis, ruff, torch CPU, transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
