#!/usr/bin/env bash
# Everything a lent GPU (one H200) should measure, in one script of under 8 minutes:
#
#   bash benchmarks/gpu.sh              # run; JSON under $OUT_DIR (default benchmarks/results/gpu)
#   bash benchmarks/gpu.sh --dry-run    # CPU: check every step's script exists and parses its arguments
#
# Steps (each with its own time limit; a step that fails or runs out is recorded, the rest still run):
#   1. compile_check  the Triton kernels compiled (not interpreted) for this GPU's architecture,
#                     with the tensor-core instructions they lower to;
#   2. kernels        benchmarks/kernels.py, GPU preset: LLaMA-2-7B / LLaMA-3-8B GEMM and decoder-layer
#                     shapes, compiled kernels vs torch bf16, each row with its error against the torch
#                     reference path (the compiled correctness check at real shapes; the pytest kernel
#                     suite runs on CPU tensors under TRITON_INTERPRET=1 by its conftest);
#   3. serving        benchmarks/serving.py --preset gpu;
#   4. recursive      benchmarks/recursive.py --preset gpu, the conversion part only (timed);
#   5. cpu_inference  benchmarks/cpu_inference.py on the GPU host's CPU (reduced: 3 systems, 1 thread).
# A summary (GPU name, per step: exit code, seconds) goes to $OUT_DIR/gpu_summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-benchmarks/results/gpu}
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2
fi
mkdir -p "$OUT"
SUMMARY=()
FAILED=0

# step NAME LIMIT_S SCRIPT ARGS...: run "$PY SCRIPT ARGS" (SCRIPT "-m" runs a module); in dry-run mode
# check the file exists and run it with --help appended, so argparse validates every argument first
step() {
  local name=$1 limit=$2; shift 2
  if [[ $1 != "-m" && ! -f $1 ]]; then
    echo "[$name] missing script $1" >&2; FAILED=1; SUMMARY+=("\"$name\": {\"rc\": 127, \"seconds\": 0}"); return
  fi
  local t0=$SECONDS rc
  if [[ $DRY == 1 ]]; then
    "$PY" "$@" --help > /dev/null; rc=$?
  else
    echo "[$name] $PY $* (limit ${limit}s)"
    timeout "$limit" "$PY" "$@"; rc=$?
  fi
  [[ $rc == 0 ]] || FAILED=1
  echo "[$name] rc=$rc $((SECONDS - t0))s"
  SUMMARY+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}")
}

ARCH=90
GPU="none (dry run)"
if [[ $DRY == 0 ]]; then
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(c[0] * 10 + c[1])") || {
    echo "no CUDA device visible to torch: run with --dry-run on CPU" >&2; exit 1; }
fi
CPU_SYSTEMS=(hf_fp32 w4a16_g64 w8a8)
if "$PY" -c "import torchao" 2>/dev/null; then CPU_SYSTEMS+=(torchao_int4_g64); fi

step compile_check 60 -m effml.kernels.compile_check --arch "$ARCH" --quick --out "$OUT/compile_check.json"
step kernels 150 benchmarks/kernels.py --out "$OUT/kernels.json"
step serving 120 benchmarks/serving.py --preset gpu --device cuda --out "$OUT/serving.json"
step recursive 60 benchmarks/recursive.py --preset gpu --parts convert2 --device cuda --out "$OUT/recursive.json"
step cpu_inference 90 benchmarks/cpu_inference.py --threads 1 --new 32 --batches 1 8 --prefill 512 \
  --ppl-windows 0 --systems "${CPU_SYSTEMS[@]}" --out "$OUT/cpu_inference.json"

{
  echo "{\"gpu\": \"$GPU\", \"dry_run\": $([[ $DRY == 1 ]] && echo true || echo false), \"steps\": {"
  (IFS=,; echo "${SUMMARY[*]}")
  echo "}}"
} > "$OUT/gpu_summary.json"
echo "summary: $OUT/gpu_summary.json"
exit $FAILED
