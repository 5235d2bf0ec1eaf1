#!/usr/bin/env bash
# Create the virtual environment and install ldmserve with its test extra.
# Installs the CPU build of torch first when no torch is present and no CUDA GPU is visible,
# so that pip does not pull a multi-GB CUDA build on CPU-only machines.
set -euo pipefail
venv=${1:-.venv}
py=${2:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install -q torch
  else
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
  fi
fi
"$venv/bin/python" -m pip install -q -e ".[test]"
