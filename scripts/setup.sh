#!/usr/bin/env bash
# Create .venv and install mmcl with its test tools at the exact versions of requirements.lock
# (made by scripts/lock.sh from pyproject.toml's ranges), so every machine gets the same libraries.
# torch is not in the lock: it is left to the machine. If .venv already has a torch (e.g. a CUDA build
# installed by hand), it is kept; otherwise torch==2.13.0 is installed first, so that pip never resolves
# a multi-GB CUDA build of torch on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.13.0  # the same pin as scripts/lock.sh
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if torch_found="$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null)"; then
  echo "setup: keeping the torch $torch_found already in .venv (not installing torch==$TORCH_VERSION)"
else
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"${PIP[@]}" -r requirements.lock
"${PIP[@]}" --no-deps -e .
