#!/usr/bin/env bash
# Runs the training-speed benchmarks for one device call, under a hard time budget.
#
#   benchmarks/run_all_gpu.sh OUT_DIR [single|multi|multi-d|multi-1b] [BUDGET_S]
#
#   single   one GPU: workloads a, b, c of train_throughput.py (ft and HF side by side)
#   multi    several GPUs: workload d (8B FSDP2, seq 8192) and the 1B FSDP / TP layouts
#   multi-d / multi-1b   one half of `multi`
#
# Every run gets `timeout` (the smaller of its own limit and what is left of BUDGET_S,
# default 570 s) and a matching --budget-s, so a slow variant is skipped, never the
# whole call; a failure is logged and the next run starts. All JSON, logs and a
# summary (summary.txt, printed last) go to OUT_DIR. Set GSM8K=path/to/train.jsonl
# (default: benchmarks/data/gsm8k_train.jsonl, else shared/data/gsm8k/train.jsonl)
# and PYTHON (default python3). WORKLOADS="a c" limits `single` to those workloads. BENCH_EXTRA_ARGS is appended to every benchmark
# command and NGPUS overrides the GPU count: `NGPUS=2 BENCH_EXTRA_ARGS="--device cpu
# --tiny" run_all_gpu.sh OUT multi` smoke-tests this script on a CPU machine.
set -u
OUT=${1:?usage: run_all_gpu.sh OUT_DIR [single|multi|multi-d|multi-1b] [BUDGET_S]}
SECTION=${2:-single}
BUDGET=${3:-570}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off (on a shared host it can take the GPUs out of service): keep
# these set for every child.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
START=$(date +%s)
STATUS="$OUT/status.txt"
: > "$STATUS"

if [ -z "${GSM8K:-}" ]; then
  for candidate in benchmarks/data/gsm8k_train.jsonl shared/data/gsm8k/train.jsonl ../shared/data/gsm8k/train.jsonl; do
    if [ -f "$candidate" ]; then GSM8K=$candidate; break; fi
  done
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run NAME LIMIT_S CMD... : the command gets --budget-s (LIMIT - 25 s of margin) appended.
run() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(( $(left) - 5 ))
  if [ "$remaining" -lt 45 ]; then
    echo "$name skipped: budget spent" | tee -a "$STATUS"; return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s, $(left)s of budget left)"
  # shellcheck disable=SC2086  # BENCH_EXTRA_ARGS is a list of words
  timeout -k 15 "$limit" "$@" --budget-s $(( limit - 25 )) ${BENCH_EXTRA_ARGS:-} > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$STATUS"
  tail -n 12 "$OUT/$name.log"
  return $rc
}

has() { case " ${WORKLOADS:-a b c} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

single() {
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  has a && run a 230 "$PY" benchmarks/train_throughput.py --workload a --out "$OUT/a.json"
  has b && run b 210 "$PY" benchmarks/train_throughput.py --workload b --out "$OUT/b.json" --warmup 4 --steps 10
  if ! has c; then
    :
  elif [ -n "${GSM8K:-}" ]; then
    run c 170 "$PY" benchmarks/train_throughput.py --workload c --gsm8k "$GSM8K" --out "$OUT/c.json" --steps 20
  else
    echo "c skipped: no GSM8K file (set GSM8K=...)" | tee -a "$STATUS"
  fi
}

# torchrun, one process per GPU (an array, not a function: `timeout` runs programs only).
TORCHRUN=("$PY" -m torch.distributed.run --standalone)
FSDP=benchmarks/fsdp_throughput.py

ngpus() { if [ -n "${NGPUS:-}" ]; then echo "$NGPUS"; else nvidia-smi -L 2>/dev/null | grep -c '^GPU'; fi; }

multi_d() {
  local n=$1 precision=mixed
  # 8B with fp32 master weights is 128 GB of state: on one GPU only pure bf16 fits.
  [ "$n" -eq 1 ] && precision=bf16
  local args=(--arch llama3_1_8b --seq-len 8192 --batch-size 1 --precision "$precision" --warmup 3 --steps 8)
  if ! run "d_${n}gpu" 170 "${TORCHRUN[@]}" --nproc-per-node "$n" "$FSDP" "${args[@]}" --ac selective --out "$OUT/d_${n}gpu.json"; then
    # Selective AC under FSDP may fail (see benchmarks/README.md); full AC is the fallback that works.
    run "d_${n}gpu_acfull" 170 "${TORCHRUN[@]}" --nproc-per-node "$n" "$FSDP" "${args[@]}" --ac full --out "$OUT/d_${n}gpu_acfull.json"
  fi
}

layout_1b() {  # layout_1b PARALLEL N [CUDA_VISIBLE_DEVICES]: llama3_2_1b shape, eager, FSDP or TP
  local parallel=$1 n=$2 devices=${3:-}
  local args=(--arch llama3_2_1b --seq-len 2048 --batch-size 4 --parallel "$parallel" --precision mixed --ac none
              --no-compile --warmup 3 --steps 10 --out "$OUT/${parallel}_1b_${n}gpu.json")
  if [ -n "$devices" ]; then
    CUDA_VISIBLE_DEVICES=$devices run "${parallel}_1b_${n}gpu" 120 "${TORCHRUN[@]}" --nproc-per-node "$n" "$FSDP" "${args[@]}"
  else
    run "${parallel}_1b_${n}gpu" 120 "${TORCHRUN[@]}" --nproc-per-node "$n" "$FSDP" "${args[@]}"
  fi
}

multi() {
  local g; g=$(ngpus)
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  nvidia-smi topo -m > "$OUT/nvidia-smi-topo.txt" 2>&1
  echo "GPUs: $g"
  if [ "$1" != "1b" ]; then
    [ "$g" -ge 2 ] && multi_d 2
    [ "$g" -ge 4 ] && multi_d 4
  fi
  if [ "$1" != "d" ]; then
    if [ "$g" -ge 4 ]; then
      # The two 2-GPU runs on disjoint GPU pairs at once: they share only host CPUs (plenty).
      layout_1b fsdp 2 0,1 & layout_1b tp 2 2,3 & wait
      layout_1b fsdp 4
      layout_1b tp 4
    elif [ "$g" -ge 2 ]; then
      layout_1b fsdp 2
      layout_1b tp 2
    fi
    layout_1b fsdp 1
  fi
  [ "$1" != "1b" ] && multi_d 1
}

case "$SECTION" in
  single) single ;;
  multi) multi all ;;
  multi-d) multi d ;;
  multi-1b) multi 1b ;;
  *) echo "unknown section $SECTION: use single, multi, multi-d or multi-1b" >&2; exit 2 ;;
esac

# A short table last: the device call returns the end of the output.
"$PY" - "$OUT" > "$OUT/summary.txt" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for path in sorted(out.glob("*.json")):
    doc = json.loads(path.read_text())
    peak = doc.get("matmul_peak", {}).get("tflops")
    print(f"# {path.name}: {doc.get('benchmark')} {doc.get('workload', doc.get('parallel', ''))} "
          f"{doc.get('environment', {}).get('device_name', '')} matmul {peak and round(peak)} TFLOP/s")
    for r in doc.get("results", []):
        if r.get("status") != "ok":
            print(f"  {r.get('name')}: {r.get('status')} {str(r.get('error', r.get('reason', '')))[:150]}")
            continue
        per_gpu = r.get("tokens_per_s_per_gpu")
        mfu = r.get("mfu_measured_peak")
        spec = r.get("mfu_spec_peak")
        print(f"  {r['name']}: tok/s {r['tokens_per_s']:,.0f} target {r['target_tokens_per_s']:,.0f}"
              + (f" per-GPU {per_gpu:,.0f}" if per_gpu else "")
              + f" MFU {mfu:.1%}" + (f" (spec {spec:.1%})" if spec else "")
              + f" mem {r.get('peak_memory_allocated_gib') or 0:.1f}/{r.get('peak_memory_reserved_gib') or 0:.1f} GiB"
              + (f" loss {r['loss_first']:.3f}->{r['loss_last']:.3f}" if "loss_first" in r else ""))
    for k, v in (doc.get("ratios") or {}).items():
        print(f"  ratio {k}: {v:.2f}x")
    if "ratio_to_torchtitan_2gpu" in doc:
        print(f"  ratio to torchtitan 2-GPU per-GPU 8.7k: {doc['ratio_to_torchtitan_2gpu']:.2f}x")
EOF
cat "$STATUS"
cat "$OUT/summary.txt"
echo "total $(( $(date +%s) - START ))s of ${BUDGET}s"
