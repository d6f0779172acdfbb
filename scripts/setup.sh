#!/usr/bin/env bash
# Creates .venv and installs verl-gq with its pinned dependencies.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so that pip never
# resolves torch to a multi-GB CUDA build. Set VERL_GQ_VENV to use another location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VERL_GQ_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=24"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -c constraints.txt -e ".[dev]"
"$VENV/bin/python" -c "import verl_gq, reward; print('verl-gq installed in', '$VENV')"
