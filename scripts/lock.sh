#!/usr/bin/env bash
# Regenerate requirements.lock: the exact version of every library mmcl installs (dependencies plus
# the `test` and `slurm` extras), resolved by uv from pyproject.toml's ranges. scripts/setup.sh
# installs from it, so a fresh machine gets the same libraries as the machine that made the lock.
#
# Run it after changing pyproject.toml's dependencies (or to move to newer releases), then commit
# requirements.lock with the pyproject change:
#   bash scripts/lock.sh                          # keeps the current pins where the ranges allow
#   bash scripts/lock.sh --upgrade                # newest releases the ranges allow
#   bash scripts/lock.sh --upgrade-package peft   # newest of one package
# Extra arguments go to `uv pip compile`. uv comes from PATH, or is installed into a temporary folder.
#
# The resolution is universal (one file with environment markers for every platform and Python
# version). Its floor is Python 3.11, not pyproject's 3.10: transformers>=5.23 needs Python >= 3.11.
# torch is left to the machine (setup.sh installs torch==$TORCH_VERSION unless .venv already has a
# torch, e.g. a CUDA build), but the resolution is made against torch==$TORCH_VERSION so that torch's
# own dependencies (sympy, networkx, filelock, fsspec, jinja2, ...) are pinned at versions it accepts.
# torch and its GPU runtime packages (nvidia-*, cuda-*, triton) are then left out of the file.
# No hashes: pip's --require-hashes would then need a hash for every package, torch's wheel too, and
# the wheel each machine gets for torch is its own choice.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0  # the same pin as scripts/setup.sh
LOCK=requirements.lock

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if command -v uv >/dev/null 2>&1; then
  UV=uv
else
  echo "uv is not on PATH: installing it into $tmp/uv" >&2
  python3 -m pip install --quiet --disable-pip-version-check --target "$tmp/uv" uv
  UV="$tmp/uv/bin/uv"
fi

echo "torch==$TORCH_VERSION" >"$tmp/torch-override.txt"
compile() {  # compile OUTPUT [uv arguments...]
  local out="$1"
  shift
  "$UV" pip compile pyproject.toml --universal --python-version 3.11 --extra test --extra slurm \
    --override "$tmp/torch-override.txt" --custom-compile-command "bash scripts/lock.sh" \
    --quiet -o "$out" "$@"
}

# First pass: find which packages torch brings for GPUs (their names change between torch releases).
if [ -f "$LOCK" ]; then
  cp "$LOCK" "$tmp/all.txt"  # start from the current pins, as the second pass does
fi
compile "$tmp/all.txt" "$@"
exclude=()
while read -r name; do
  exclude+=(--no-emit-package "$name")
done < <({ echo torch; sed -n -E 's/^(torch|triton|pytorch-triton[a-z0-9-]*|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==.*/\1/p' "$tmp/all.txt"; } | sort -u)

# Second pass: the lock itself, without them.
compile "$LOCK" "${exclude[@]}" "$@"

if grep -E -i '^(torch|triton|pytorch-triton|nvidia-|cuda-)' "$LOCK"; then
  echo "error: $LOCK still names torch or a GPU runtime package (above)" >&2
  exit 1
fi
echo "wrote $LOCK: $(grep -c -E '^[A-Za-z0-9]' "$LOCK") pinned lines" >&2
