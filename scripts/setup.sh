#!/usr/bin/env bash
# One-step environment set-up. Keeps an already installed torch (e.g. a CUDA build on a cluster);
# otherwise installs torch 2.13.0 (on our CPU machines that is a local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
