#!/usr/bin/env bash
# One short device call (about 4 minutes on one H200): FP8 training against bf16 on
# workload (a), then ft's decode step at batch 1 and 64 with its bandwidth fraction.
#
#   benchmarks/run_fp8_decode_gpu.sh OUT_DIR [BUDGET_S]
#
# torchao is installed from a wheel in .whl/ at the repository root when it is not
# importable (no network needed). Each run has its own timeout inside BUDGET_S
# (default 240); JSON and logs go to OUT_DIR. BENCH_EXTRA_ARGS / GEN_EXTRA_ARGS are
# appended to the training / generation commands (`--device cpu --tiny` smoke-tests
# this script on a CPU machine, where the fp8 variant is skipped with its reason).
set -u
OUT=${1:?usage: run_fp8_decode_gpu.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-240}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# Only where fp8 can run: a CPU smoke test leaves the environment as it is.
if "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && ! "$PY" -c "import torchao.float8" 2>/dev/null; then
  wheel=$(ls .whl/torchao-*.whl 2>/dev/null | head -1)
  if [ -n "$wheel" ]; then "$PY" -m pip install -q --no-deps "$wheel" > "$OUT/torchao_install.log" 2>&1; fi
fi
"$PY" -c "import torchao; print('torchao', torchao.__version__)" 2>/dev/null || echo "torchao: not importable"

# (a) 1B, 8 x 2048, pure bf16 against the same with float8 linears (tensorwise).
limit=$(( $(left) * 62 / 100 ))
timeout "$limit" "$PY" benchmarks/train_throughput.py --workload a \
  --variants ft_bf16_compile,ft_fp8_tensorwise_compile --warmup 3 --steps 10 --budget-s $(( limit - 25 )) \
  --out "$OUT/a_fp8.json" ${BENCH_EXTRA_ARGS:-} > "$OUT/a_fp8.log" 2>&1
echo "train_throughput exit $?"; grep -E "tok/s|skipped|x$|error" "$OUT/a_fp8.log" | tail -6

# Generation, 1B bf16, 128 + 256 tokens: compiled decode step in CUDA graphs, batch 1 and 64.
limit=$(( $(left) - 5 ))
timeout "$limit" "$PY" benchmarks/generate_throughput.py --batch-sizes 1 64 --ft-modes compile --hf-caches \
  --repeats 1 --out "$OUT/generate.json" ${GEN_EXTRA_ARGS:-} > "$OUT/generate.log" 2>&1
echo "generate_throughput exit $?"
"$PY" - "$OUT/generate.json" <<'PYEOF' 2>&1 || true
import json, sys
doc = json.load(open(sys.argv[1]))
for r in doc["results"]:
    keys = ("batch_size", "decode_path", "tokens_per_s", "decode_step_s", "hbm_fraction")
    print({k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k)) for k in keys})
PYEOF
echo "total $(( $(date +%s) - START )) s"
