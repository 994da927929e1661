#!/usr/bin/env bash
# Run every continual-learning method on one stream with the given seeds, then compare them.
#   bash scripts/compare_methods.sh [SEED ...]            (default seed: 0)
# Environment: METHODS (space-separated, default: every method `mmcl list` names), CONFIG (an experiment
# YAML, default none), OUT (parent dir of the runs, default runs/sweep). Finished runs are skipped, so it
# resumes too.
set -euo pipefail
cd "$(dirname "$0")/.."
MMCL="${MMCL:-.venv/bin/mmcl}"
if [ -z "${METHODS:-}" ]; then
  # the first word of each indented line of the `methods:` section of `mmcl list`
  METHODS="$("$MMCL" list | awk '/^methods:/ { inside = 1; next } /^[^ ]/ { inside = 0 } inside && NF { print $1 }')"
  if [ -z "$METHODS" ]; then
    echo "error: \`$MMCL list\` named no methods" >&2
    exit 1
  fi
fi
OUT="${OUT:-runs/sweep}"
SEEDS=("${@:-0}")
runs=()
for seed in "${SEEDS[@]}"; do
  for method in $METHODS; do
    dir="$OUT/$method-s$seed"
    "$MMCL" run ${CONFIG:+"$CONFIG"} --method "$method" --seed "$seed" --name "$method-s$seed" --out "$dir" \
      --set training.progress_bar=false
    runs+=("$dir")
  done
done
"$MMCL" compare "${runs[@]}" --out "$OUT/compare"
