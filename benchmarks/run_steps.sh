#!/usr/bin/env bash
# Runs a list of benchmark commands in one device call, each under its own timeout
# and all under one budget, so a slow or failing command costs only itself.
#
#   benchmarks/run_steps.sh OUT_DIR BUDGET_S STEPS_FILE
#
# STEPS_FILE: one command per line, `NAME LIMIT_S COMMAND...` ('#' lines are comments);
# `$OUT` in a command is OUT_DIR. Each command's output goes to OUT_DIR/NAME.log, its
# exit status and time to OUT_DIR/status.txt. Each wheel in .whl/ at the repository root
# (torchao; torchtitan and the small packages its modules import) whose distribution is
# not installed is installed into /tmp/ft-site, without dependencies (the device
# machines have no network).
set -u
OUT=${1:?usage: run_steps.sh OUT_DIR BUDGET_S STEPS_FILE}
BUDGET=${2:?budget in seconds}
STEPS=${3:?steps file}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=$(cd "$(dirname "$STEPS")" && pwd)/$(basename "$STEPS")
cd "$ROOT" || exit 1
export OUT PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
missing=()
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  dist=$(basename "$wheel"); dist=${dist%%-*}
  "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ft-site "${missing[@]}" \
    > "$OUT/wheels_install.log" 2>&1
  echo "installed from .whl/: ${missing[*]}" >> "$OUT/wheels_install.log"
  export PYTHONPATH="/tmp/ft-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
: > "$OUT/status.txt"
while read -r name limit command; do
  case "$name" in ''|'#'*) continue ;; esac
  left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  if [ "$left" -lt 30 ]; then echo "$name skipped: budget spent" | tee -a "$OUT/status.txt"; continue; fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" bash -c "$command" > "$OUT/$name.log" 2>&1 < /dev/null
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$OUT/status.txt"
  tail -n 6 "$OUT/$name.log"
done < "$STEPS"
