#!/usr/bin/env bash
# Create .venv and install mmcl with its test tools. torch is installed first, pinned, so that pip
# never resolves a multi-GB CUDA build of torch on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
