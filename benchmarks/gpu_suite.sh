#!/usr/bin/env bash
# Every GPU test and benchmark in one device call (the device time is scarce: start the machine once).
#   single GPU:  bash benchmarks/gpu_suite.sh single      (nvidia-h200)
#   two GPUs:    bash benchmarks/gpu_suite.sh tp          (nvidia-h200-x2: tensor parallelism)
# Logs go to $OUT (or ./gpu_out); the last lines of each log are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
out=${OUT:-./gpu_out}
mkdir -p "$out"
step() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name (exit $?)"
  tail -n 14 "$out/$name.log"
}
case "${1:-single}" in
  single)
    step gpu_tests 240 python -m pytest -m gpu tests
    step throughput 240 python benchmarks/throughput.py --hf-new-tokens 4 --json "$out/throughput.json"
    step mismatch 200 python benchmarks/mismatch.py
    ;;
  tp)
    step tp_tests 200 python -m pytest -x tests/test_tp.py
    step tp_bench 300 python benchmarks/tp.py --tp 2 --layers 4
    ;;
esac
